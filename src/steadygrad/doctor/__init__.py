"""The doctor: diagnose a model on the user's data, try each candidate fix on fresh copies over several seeds,
and recommend the one that measurably trains better on held-out data.

    report = steadygrad.doctor(make_model, data=loader, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4))
    print(report); print(report.patch())

Every candidate is applied to a freshly built model and trained the same way as the unchanged model (the
control): the same optimizer, schedule, precision, batches and seeds; each repeat is scored on held-out batches
no trial trains on. The user's model object is never modified.

The package: ``_data`` (the user's data as training and held-out batches; a teacher's targets when there are
none), ``_trial`` (one repeat: train, then score), ``_candidates`` (one builder per ``Fix`` action), ``_report``
(the trials, the ranking and the recommendation rule), ``_workers`` (trials in parallel processes), ``_run``
(``doctor`` itself). The findings come from ``steadygrad.diagnose``.
"""

from steadygrad.doctor._candidates import Candidate, NotApplicable, candidate, residual_projections
from steadygrad.doctor._data import Batch, Split, first_batch, split_data
from steadygrad.doctor._report import MARGIN, DoctorReport, Trial
from steadygrad.doctor._run import UserCodeError, doctor
from steadygrad.doctor._trial import Changes, Repeat, Settings

__all__ = [
    "MARGIN",
    "Batch",
    "Candidate",
    "Changes",
    "DoctorReport",
    "NotApplicable",
    "Repeat",
    "Settings",
    "Split",
    "Trial",
    "UserCodeError",
    "candidate",
    "doctor",
    "first_batch",
    "residual_projections",
    "split_data",
]
