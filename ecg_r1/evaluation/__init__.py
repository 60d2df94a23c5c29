"""The evaluation stage: metrics with intervals, baselines, the model comparison, its report and
the champion/challenger promotion.

Takes: trained model folders and the test splits. Gives: ``metrics.json``, ``comparison.md``,
plots and the promotion decision. :mod:`.evaluate` (metrics, bootstrap CIs), :mod:`.paired`
(two models on the same cases: paired bootstrap, McNemar), :mod:`.baselines` (majority,
feature baseline, Bayes ceiling), :mod:`.comparison` (every model and baseline on the same
cases, the pipeline of the steps below), :mod:`.cases` (the cases evaluated),
:mod:`.predictions` (a model's answers), :mod:`.references` (the fitted reference rows),
:mod:`.results` (metrics per row, split and hospital, paired comparisons), :mod:`.figures`
(which plots show what), :mod:`.outputs` (the comparison folder's files), :mod:`.real_records`
(real labelled TWI records for the sim-to-real section), :mod:`.report` (tables and plots),
:mod:`.promotion` (the decision rule), :mod:`.registry` (the results on the registered versions
in MLflow, and the promotion itself).
"""
