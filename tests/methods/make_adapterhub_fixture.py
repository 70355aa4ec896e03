"""Write tests/methods/fixtures/adapterhub_*: AdapterHub's own bottleneck adapters on tiny models.

Run with a Python that has AdapterHub's ``adapters`` library (it pins transformers ~=4.57, so not
loraforge's environment), e.g.::

    python3 -m venv /tmp/advenv
    /tmp/advenv/bin/pip install torch transformers==4.57.6 adapters==1.3.0
    /tmp/advenv/bin/python tests/methods/make_adapterhub_fixture.py

For a tiny Llama and a tiny GPT-2 (built from a config with a fixed seed; their weights are saved
too, as transformers versions initialise differently) and each of AdapterHub's ``seq_bn``
(Pfeiffer), ``double_seq_bn`` (Houlsby) and ``par_bn`` (parallel) configs, the adapter gets random
weights (its "mam_adapter" init would start at zero) and is saved with the library's own
``save_adapter``; the fixture keeps that file's tensors under their own keys and the logits on
fixed inputs. ``test_bottleneck.py`` loads them into loraforge and compares (no ``adapters`` needed).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).parent / "fixtures"
CONFIGS = {"seq_bn": "SeqBnConfig", "double_seq_bn": "DoubleSeqBnConfig", "par_bn": "ParBnConfig"}
REDUCTION = 4  # bottleneck 16 / 4 = 4


def tiny(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
        return LlamaForCausalLM(cfg).eval(), cfg
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg).eval(), cfg


def main() -> None:
    import adapters
    from safetensors.torch import load_file, save_file

    OUT.mkdir(exist_ok=True)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(5))
    meta = {
        "versions": {"adapters": adapters.__version__, "torch": torch.__version__},
        "ids": ids.tolist(),
        "reduction_factor": REDUCTION,
        "models": {},
    }
    for arch in ("llama", "gpt2"):
        model, cfg = tiny(arch)
        tensors = {f"base.{k}": v.clone() for k, v in model.state_dict().items()}  # (clones: tied weights)
        with torch.no_grad():
            tensors["logits.base"] = model(ids).logits
        adapters.init(model)
        entry = {"config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}, "adapters": {}}
        for i, (name, cls) in enumerate(CONFIGS.items()):
            model.add_adapter(name, config=getattr(adapters, cls)(reduction_factor=REDUCTION))
            g = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if f".adapters.{name}." in pname:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            model.set_active_adapters(name)
            with torch.no_grad():
                tensors[f"logits.{name}"] = model(ids).logits
            with tempfile.TemporaryDirectory() as d:
                model.save_adapter(d, name, use_safetensors=True)
                saved = load_file(str(Path(d) / "adapter.safetensors"))
                hub_config = json.loads((Path(d) / "adapter_config.json").read_text())
            tensors.update({f"{name}/{k}": v for k, v in saved.items()})
            entry["adapters"][name] = hub_config  # (its whole adapter_config.json)
        save_file(tensors, str(OUT / f"adapterhub_{arch}.safetensors"))
        meta["models"][arch] = entry
    (OUT / "adapterhub.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    sizes = {p.name: p.stat().st_size for p in OUT.glob("adapterhub*")}
    print(sizes, file=sys.stderr)


if __name__ == "__main__":
    main()
