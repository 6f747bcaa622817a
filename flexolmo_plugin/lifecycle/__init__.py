"""Layer 3, the FlexOlmo lifecycle, in the order it happens.

A data owner: :mod:`.data` (own text -> indexed dataset), :mod:`.domain_embedding` (router row
r_i), :mod:`.upcycle` (public model -> ``[public, owner]``), :mod:`.freezing` (anchoring: what
trains), :mod:`.package` (what is shared, bound to :mod:`.anchor`).  A coordinator: :mod:`.merge`,
:mod:`.opt_out`, :mod:`.evaluation`.  Built on the checkpoint I/O layer (:mod:`flexolmo_plugin.conversion`).
"""
