"""The application layer: what the ``jaxprompt`` command runs.

One module per runner, all sharing one run directory (:mod:`jaxprompt.app.rundir`):

* :mod:`~jaxprompt.app.experiment`: train a method under a protocol config, evaluate it;
* :mod:`~jaxprompt.app.tpt`: test-time prompt tuning over a test split;
* :mod:`~jaxprompt.app.pouf`: POUF, unsupervised adaptation on unlabeled target data;
* :mod:`~jaxprompt.app.sweep`: datasets x shots x seeds in one command;
* :mod:`~jaxprompt.app.flags`, :mod:`~jaxprompt.app.console`: flags, logging and progress.

Configs (``ml_collections``) stop here: the library underneath takes typed keyword arguments.
"""
