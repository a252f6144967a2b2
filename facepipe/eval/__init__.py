"""Evaluation protocols, vectorised and chunked so they run at IJB-C size.

- :mod:`~facepipe.eval.verification`: InsightFace 10-fold protocol (.bin pair sets), k-fold accuracy
  for any score, ROC, TAR@FAR;
- :mod:`~facepipe.eval.risk`: ProbFace risk-controlled accuracy (reject the most uncertain pairs);
- :mod:`~facepipe.eval.ijb`: image -> media -> template aggregation (InsightFace rule or an
  uncertainty fusion callback) and template 1:1 verification;
- :mod:`~facepipe.eval.scoring`: cosine / MLS / callable pair scores in chunks or template x template
  products;
- :mod:`~facepipe.eval.identification`, :mod:`~facepipe.eval.openset`, :mod:`~facepipe.eval.video`:
  1:N CMC and TPIR@FPIR, open-set gallery decisions, video set-to-set verification;
- :mod:`~facepipe.eval.features` (features-file format), :mod:`~facepipe.eval.report` (metrics JSON +
  PNG plots).
Submodules are imported on use; this package imports nothing heavy.
"""
