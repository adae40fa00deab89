"""Analysis of finished runs, without their models: the runs a comparison reads and how they
group (``runsets``), tables (``tables``; LaTeX: ``latex``) and the HTML report (``report``), figures (``plots``), statistics
over seeds and paired intervals (``significance``), the paired comparison with a baseline (``paired``), and rectification of stored scores
(``calibrate``).

May import: the top-level modules (config, keys, metrics, rectify, io, errors ...) and
:mod:`cilkit.rundir` (the names and readers of the files it reads); never ``cilkit.run`` or
``cilkit.runs`` (which import its figures and summaries), a method, the engine or a model.
"""
