"""loraforge: LoRA and QLoRA fine-tuning, and many adapters on one base model.

The public API is a set of plain functions on a plain ``torch.nn.Module``::

    import loraforge as lf
    model = lf.inject(model, lf.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    lf.save_adapter(model, "out/adapter")      # PEFT-compatible directory
"""

__version__ = "0.1.0"

# Every public name loads on first use: `import loraforge` (and so the `loraforge` command, whose
# entry point lives in this package) stays cheap and imports no torch, so the CLI can answer
# --help at once and catch a Ctrl-C while torch loads.
_LAZY = {
    **{
        name: ("loraforge.adapters", name)
        for name in (
            "adapter_batch",
            "add_weighted_adapter",
            "delete_adapter",
            "disable_adapters",
            "list_adapters",
            "merge",
            "merge_and_unload",
            "merged_adapters",
            "set_adapter",
            "set_compute",
            "unload",
            "unmerge",
        )
    },
    "LoraConfig": ("loraforge.config", "LoraConfig"),
    "IA3Config": ("loraforge.methods.ia3", "IA3Config"),
    "BottleneckConfig": ("loraforge.methods.bottleneck", "BottleneckConfig"),
    "PrefixTuningConfig": ("loraforge.methods.prompt", "PrefixTuningConfig"),
    "PromptTuningConfig": ("loraforge.methods.prompt", "PromptTuningConfig"),
    "PromptEncoderConfig": ("loraforge.methods.prompt", "PromptEncoderConfig"),
    "add_adapter": ("loraforge.injection", "add_adapter"),
    "count_parameters": ("loraforge.injection", "count_parameters"),
    "inject": ("loraforge.injection", "inject"),
    "print_trainable_parameters": ("loraforge.injection", "print_trainable_parameters"),
    "load_adapter": ("loraforge.adapter_files", "load_adapter"),
    "save_adapter": ("loraforge.adapter_files", "save_adapter"),
    "quant": ("loraforge.quant", None),
    "QuantConfig": ("loraforge.quant", "QuantConfig"),
    "quantize": ("loraforge.quant", "quantize"),
    "Linear4bit": ("loraforge.quant", "Linear4bit"),
    "load_model": ("loraforge.model_files", "load_model"),
    "save_model": ("loraforge.model_files", "save_model"),
    "train": ("loraforge.training", "train"),
    "TrainConfig": ("loraforge.training", "TrainConfig"),
    "build_optimizer": ("loraforge.optim", "build_optimizer"),
    "resize_adapter": ("loraforge.lowrank.resize", "resize_adapter"),
    "analyze_adapter": ("loraforge.lowrank.analyze", "analyze_adapter"),
    "extract_lora": ("loraforge.lowrank.extract", "extract_lora"),
}
__all__ = sorted(_LAZY)


def __dir__():
    return sorted([*globals(), *_LAZY])


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
