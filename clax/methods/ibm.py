"""IBM — Information-Bottleneck Masked sub-networks (Chen et al., arXiv 2312.00840), SPEC.md section 3.

Composition: the masked network of :mod:`clax.transforms.consolidation` with the mask
:func:`clax.transforms.variational_mask.ib_mask` (``mu``/``logD``, noisy forward, mask from log alpha),
then the transforms ``bottleneck`` (:func:`clax.transforms.variational_mask.bottleneck`: KL term,
periodic SVD ratios, re-initialisation of free positions), ``consolidation`` (union of task masks
frozen) and, with ``bn="refresh"``, ``bn_refresh``.

* ``per_task["mu"]``, ``per_task["logD"]``: task ``t``'s variational parameters (row ``t``). At the
  start of task ``t > 0`` row ``t`` takes row ``t - 1``'s values at consolidated positions and fresh
  draws (``N(1, 0.01)``, ``N(-10, 0.01)``) at free positions, as the authors' ``reset_mask``.
* Training: ``W_eff = W * (mu + eps * exp(logD / 2))``; loss ``CE + kl_fac * sum_l ratio_l * KL_l``.
  The authors' code divides the KL sum by the batch size (``kl_per_sample``, on by default).
* ``extra["bottleneck"]["ratio"]``: per-layer SVD ratio, recomputed at the end of every ``svd_every``-th epoch of a
  task (epochs 0, 50, ... as the authors) from the layer's centred output features on up to
  ``svd_samples`` training samples, with the mean weights ``W * zscale``.
* After task ``t`` the mask ``logD - log(mu^2) < 0`` of row ``t`` joins the consolidated union
  (weights frozen there). Test time for task ``t``: ``W * zscale_t * mask_t``,
  ``zscale = mu + exp(logD / 2)`` (the authors' deterministic ``reparameterize``).
* BatchNorm (``bn``): training collects running statistics of the noisy, unpruned ``W * z``, which the
  test network ``W * zscale * mask`` does not share. By default (``"refresh"``) task ``t``'s statistics
  are re-estimated at the end of the task with its test-time weights
  (:func:`clax.transforms.consolidation.refresh_task`); ``"batch"`` is the authors' choice (their
  BatchNorm has ``track_running_stats=False``: test batches are normalised with their own statistics);
  ``"running"`` keeps the training statistics (the mismatch, for comparison).
* ``vb_lr_mult``: the variational parameters are stored divided by this factor, so that an optimizer
  step moves them ``vb_lr_mult`` times further (a learning-rate multiplier that also works with Adam).
  The default, 50, suits the short split-digits runs (~90 steps a task: at the paper's 1 the
  variational parameters barely move and every weight is kept); the paper protocols in
  ``experiments/`` set 1, the authors' code (one Adam over every parameter), at which a short budget
  prunes little or nothing (``experiments/ibm_cifar100.py``).
* FWT: clax reports it as null (no task can be evaluated before its mask exists);
  :func:`authors_fwt` is the figure the authors' code prints.
"""
from __future__ import annotations

import numpy as np

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import NON_NEGATIVE, POSITIVE, POSITIVE_INT, REGEX, between, check_settings, one_of
from clax.transforms import batchnorm, consolidation
from clax.transforms import variational_mask as vm

IBM_DEFAULTS = {
    "kl_fac": 1e-3, "kl_per_sample": True, "svd": True, "svd_every": 50, "svd_var": 0.97,
    "svd_samples": 256, "init_mu": 1.0, "init_logD": -10.0, "init_std": 0.01, "threshold": 0.0,
    "vb_lr_mult": 50.0, "layers": r"kernel$", "bn": "refresh",
}
IBM_RULES = {
    "kl_fac": NON_NEGATIVE, "svd_every": POSITIVE_INT, "svd_var": between(0, 1, "(]"), "svd_samples": POSITIVE_INT,
    "init_std": NON_NEGATIVE, "vb_lr_mult": POSITIVE, "layers": REGEX, "bn": one_of(*consolidation.BN_MODES),
}
#: one line per setting, as ``clax list ibm`` prints it
IBM_HELP = {
    "kl_fac": "weight of the KL (information bottleneck) term",
    "kl_per_sample": "divide the KL sum by the batch size, as the authors' code",
    "svd": "weight each layer's KL by its SVD ratio",
    "svd_every": "recompute the SVD ratios every this many epochs of a task",
    "svd_var": "fraction of variance the SVD ratio's singular values explain",
    "svd_samples": "training samples for the SVD ratios",
    "init_mu": "initial mean of the variational mask",
    "init_logD": "initial log variance of the variational mask",
    "init_std": "std of the initial draws of mu and logD",
    "threshold": "a weight is kept where log alpha < threshold",
    "vb_lr_mult": "learning-rate multiplier of the variational parameters",
    "layers": "regular expression over backbone parameter paths: the masked weights",
    "bn": "test-time BatchNorm statistics: re-estimated per task, of the test batch, or running",
}


def ibm(ctx: Context, **settings) -> Method:
    """IBM with the settings of ``IBM_DEFAULTS`` (see the module docstring; ``bn``: refresh | batch |
    running)."""
    s = check_settings("ibm", IBM_DEFAULTS, settings, IBM_RULES)
    bn = consolidation.check_bn("ibm.bn", s["bn"])
    scale = float(s["vb_lr_mult"])
    mask = vm.ib_mask(ctx.num_tasks, scale, s["init_mu"], s["init_logD"], s["init_std"], s["threshold"])
    refresh = [batchnorm.refresh(ctx, mask.test)] if bn == "refresh" else []
    return chain(consolidation.model(ctx, mask, s["layers"], bn, name="ibm"),
                 vm.bottleneck(ctx, scale, s["kl_fac"], bool(s["kl_per_sample"]), bool(s["svd"]),
                               int(s["svd_every"]), s["svd_var"], int(s["svd_samples"])),
                 consolidation.freeze(mask, ctx.num_tasks),
                 *refresh, name="ibm", evaluates_unseen=False)


def authors_fwt(A, b) -> float:
    """FWT as zackschen/IBM-Net's ``utils/training.py`` reports it (in the units of ``A`` and ``b``).

    Their loop stores row ``r`` of the accuracy matrix with the ``r + 1`` tasks seen so far; their
    ``forgetting()`` (``utils/metrics.py``) runs first and pads every row with zeros in place, so the
    ``results[c-1][c]`` that ``forward_transfer`` then reads is 0, never an accuracy:
    ``mean_{c >= 1} (0 - b[c]) = -mean_{c >= 1} b[c]``, minus the accuracy of the freshly initialised
    network (``b``, their ``random_results``), whatever ``A`` holds above its diagonal. The GEM FWT of
    :func:`clax.metrics.fwt` reads ``A[c-1, c]`` instead.

    Args:
      A: ``[T, T]`` accuracy matrix (only the tasks seen, ``c <= r``, are read, as theirs).
      b: ``[T]`` accuracies of the freshly initialised network on each task.
    """
    A, b = np.asarray(A, np.float64), np.asarray(b, np.float64)
    T = A.shape[0]
    if b.shape != (T,) or T < 2:
        raise ValueError(f"authors_fwt needs T >= 2 tasks and b of shape ({T},), got {b.shape}")
    padded = np.tril(np.nan_to_num(A))  # their rows: the tasks seen, then the zeros of forgetting()
    return float(np.mean([padded[c - 1, c] - b[c] for c in range(1, T)]))
