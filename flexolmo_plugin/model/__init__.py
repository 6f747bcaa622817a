"""Layer 1, the model: FlexOlmo as a small diff on Megatron-Core (megatron-core and torch only).

:mod:`.config` (architecture record and its one translation to Megatron fields), :mod:`.layout`
(the one parallel-layout type), :mod:`.norms`, :mod:`.attention`, :mod:`.layer`, :mod:`.router`,
:mod:`.experts` (the modules), :mod:`.spec` (how they are injected into Megatron's specs),
:mod:`.build` (``GPTModel`` construction, logits) and :mod:`.parallel` (process groups).
Nothing here reads or writes checkpoints, and nothing here patches torch.
"""
