"""The data-flexible half of FlexOlmo: expert packages, merge and opt-out.

* :mod:`.package` -- what a data owner shares: its expert's FFNs, router rows and bias, with a
  manifest binding them to the anchor they were trained against;
* :mod:`.merge` -- a coordinator stacks packages onto the public model (expert 0);
* :mod:`.opt_out` -- an owner's expert is removed physically, or masked at run time by name.
"""
