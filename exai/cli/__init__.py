"""The ``exai`` command line: one parser tree for every subcommand (:mod:`exai.cli.main`) and
``exai doctor`` (:mod:`exai.cli.doctor`). ``python -m exai.cli`` runs it as the ``exai`` script
does."""
