"""Layer 2, checkpoint I/O (installed as ``flexolmo_plugin.conversion``).

:mod:`.mapping` is the one table of FlexOlmo's tensors (names, shapes, tensor-parallel split, HF
names); :mod:`.slots` places its canonical tensors in a sharded model; :mod:`.safetensors_reader` /
:mod:`.safetensors_writer` and :mod:`.mcore_io` (torch_dist, with :mod:`.dcp_io`, :mod:`.direct_io`)
stream tensors in and out; :mod:`.atomic` makes every output all-or-nothing; :mod:`.convert` is
``flexolmo convert``.
"""
