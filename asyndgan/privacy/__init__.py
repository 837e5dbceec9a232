"""Differential privacy for a site's discriminator: accountant, subject sampling, DP-SGD gradients, budget ledger.

Imports nothing from grpc or the services: the site logic composes these parts (see each module's docstring).
"""

from asyndgan.privacy.accountant import DEFAULT_ORDERS, Segment, calibrate_sigma, epsilon, max_steps, merge_step
from asyndgan.privacy.dpsgd import (
    accumulate_grads,
    check_dp_compatible,
    clip_per_sample,
    dp_sgd_gradients,
    gan_real_loss,
    per_sample_gradients,
)
from asyndgan.privacy.ledger import PrivacyLedger
from asyndgan.privacy.sampling import PoissonSubjectSampler, secure_generator, secure_rng

__all__ = [
    "DEFAULT_ORDERS",
    "PoissonSubjectSampler",
    "PrivacyLedger",
    "Segment",
    "accumulate_grads",
    "calibrate_sigma",
    "check_dp_compatible",
    "clip_per_sample",
    "dp_sgd_gradients",
    "epsilon",
    "gan_real_loss",
    "max_steps",
    "merge_step",
    "per_sample_gradients",
    "secure_generator",
    "secure_rng",
]
