"""Low-rank tools: look at, extract, shrink and compare the rank of weight updates.

``spectra`` holds the shared algebra (truncated SVD, energy, effective/stable rank, the LoRA
paper's subspace similarity and amplification factor); ``extract`` turns a full fine-tune into a
PEFT adapter, ``resize`` changes an adapter's rank, ``analyze`` reports an adapter's spectra.
"""
