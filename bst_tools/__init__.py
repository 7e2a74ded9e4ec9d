"""Helpers that several entry points in scripts/ share: the offline corpora's documents (`corpus`), data loading
(`data`), the BPE tokenizer (`tokenizer`), the optimizer recipe (`training`), the loss by slot (`evaluation`) and
model cards and staged folders (`hub`).

Not part of the model: `modeling_bst` never imports this package, so a checkpoint's remote code needs torch and
transformers only.
"""
