"""The comparison report of a sweep: one ranked table over every run in a folder, its Markdown and plots.

One module a step: :mod:`~skinlesion.reporting.collect` reads what each run left (a row per run, its
predictions); :mod:`~skinlesion.reporting.rank` pools seeds, ranks the configurations and pairs rank 1
with each other one on the same images; :mod:`~skinlesion.reporting.markdown` and
:mod:`~skinlesion.reporting.plots` present them; :mod:`~skinlesion.reporting.write` writes the report's
files. Two ways in: the ``python -m skinlesion.report`` command, and the Hydra callback
:class:`~skinlesion.reporting.callback.MultirunReport` at the end of every training sweep.
"""
