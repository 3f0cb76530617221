"""IBM — Information-Bottleneck Masked sub-networks (Chen et al., arXiv 2312.00840), SPEC.md section 3.

Composition: :mod:`clax.transforms.consolidation` (masked backbone, union of task masks frozen) and
:mod:`clax.transforms.variational_mask` (``mu``/``logD``, noisy forward, KL, mask from log alpha).

* ``per_task["mu"]``, ``per_task["logD"]``: task ``t``'s variational parameters (row ``t``). At the
  start of task ``t > 0`` row ``t`` takes row ``t - 1``'s values at consolidated positions and fresh
  draws (``N(1, 0.01)``, ``N(-10, 0.01)``) at free positions, as the authors' ``reset_mask``.
* Training: ``W_eff = W * (mu + eps * exp(logD / 2))``; loss ``CE + kl_fac * sum_l ratio_l * KL_l``.
  The authors' code divides the KL sum by the batch size (``kl_per_sample``, on by default).
* ``extra["ratio"]``: per-layer SVD ratio, recomputed at the end of every ``svd_every``-th epoch of a
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
  ``experiments/`` set 1, which reproduces the paper.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clax import partition as P
from clax.methods.base import Context, Method, TaskData
from clax.settings import NON_NEGATIVE, POSITIVE, POSITIVE_INT, REGEX, between, check_settings, one_of
from clax.transforms import batchnorm, classifier, consolidation
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


def ibm(ctx: Context, **settings) -> Method:
    """IBM with the settings of ``IBM_DEFAULTS`` (see the module docstring; ``bn``: refresh | batch |
    running)."""
    s = check_settings("ibm", IBM_DEFAULTS, settings, IBM_RULES)
    bn = consolidation.check_bn("ibm.bn", s["bn"])
    T, scale = ctx.num_tasks, float(s["vb_lr_mult"])
    refresh = batchnorm.make_refresh(ctx.backbone.apply)

    def fresh(key, weights):
        return vm.init(key, weights, s["init_mu"], s["init_logD"], s["init_std"])

    def init(key):
        k_net, k_vb = jax.random.split(key)
        cl = consolidation.init(k_net, ctx, s["layers"], "ibm.layers")
        w = cl.shared["weights"]
        rows = [fresh(k, w) for k in jax.random.split(k_vb, T)]
        vb = jax.tree.map(lambda *a: jnp.stack(a) / scale, *rows)
        ratio = jax.tree.map(lambda a: jnp.ones((), jnp.float32), w)
        return cl.replace(per_task={**cl.per_task, "mu": vb["mu"], "logD": vb["logD"]},
                          extra={**cl.extra, "ratio": ratio})

    def variational(cl, t):
        """Task ``t``'s ``(mu, logD)`` in their natural scale."""
        f = lambda a: a * scale  # noqa: E731
        return (jax.tree.map(f, P.task_row(cl.per_task["mu"], t)),
                jax.tree.map(f, P.task_row(cl.per_task["logD"], t)))

    def test_weights(cl, t):
        mu, log_d = variational(cl, t)
        keep = vm.mask(mu, log_d, s["threshold"])
        return jax.tree.map(lambda w, z, m: w * z * m.astype(w.dtype), cl.shared["weights"],
                            vm.zscale(mu, log_d), keep)

    def loss(cl, batch, key, t):
        mu, log_d = variational(cl, t)
        z = vm.sample_z(key, mu, log_d)
        w_eff = consolidation.apply_masks(cl.shared["weights"], z)
        logits, state = consolidation.forward(cl, ctx, w_eff, batch["x"], t, batch["tid"], train=True)
        ce = classifier.cross_entropy(logits, batch["y"])
        kl = vm.total_kl(mu, log_d, cl.extra["ratio"])
        if s["kl_per_sample"]:
            kl = kl / batch["x"].shape[0]
        total = ce + s["kl_fac"] * kl
        return total, (state, {"loss": total, "ce": ce, "kl": kl})

    def predict(cl, x, tid):
        t = consolidation.batch_task(tid)
        return consolidation.forward(cl, ctx, test_weights(cl, t), x, t, tid, train=False, bn=bn)[0]

    def begin_task(cl, data: TaskData):
        if data.t == 0:
            return cl
        cons = cl.extra["consolidated"]
        per_task = dict(cl.per_task)
        for name in ("mu", "logD"):
            prev, new = P.task_row(cl.per_task[name], data.t - 1), P.task_row(cl.per_task[name], data.t)
            per_task[name] = P.set_task_row(cl.per_task[name], data.t, consolidation.reinit_free(prev, new, cons))
        return cl.replace(per_task=per_task)

    @jax.jit
    def layer_outputs(cl, x, t):
        mu, log_d = variational(cl, t)
        w = jax.tree.map(lambda a, z: a * z, cl.shared["weights"], vm.zscale(mu, log_d))
        variables = {"params": P.merge(w, P.task_row(cl.per_task["rest"], t))}
        stats = P.task_row(cl.state["backbone"], t)
        if stats:
            variables["batch_stats"] = stats
        _, inter = ctx.backbone.module.apply(
            variables, x, train=False, mutable=["intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, (nn.Dense, nn.Conv)))
        return inter["intermediates"]

    def ratios(cl, data: TaskData) -> dict:
        """Per-layer SVD ratio of the layers' output features on up to ``svd_samples`` samples."""
        n = min(int(s["svd_samples"]), data.x.shape[0])
        idx = np.asarray(jax.random.permutation(data.key, data.x.shape[0]))[:n]
        inter = layer_outputs(cl, jnp.asarray(data.x[idx]), jnp.int32(data.t))

        def one(path, _):
            node = inter
            for k in path[:-1]:  # the kernel's module path
                node = node[k.key]
            return jnp.float32(vm.svd_ratio(node["__call__"][0], s["svd_var"]))

        return jax.tree_util.tree_map_with_path(one, cl.extra["ratio"])

    def end_epoch(cl, data: TaskData, epoch: int):
        if s["svd"] and epoch % int(s["svd_every"]) == 0:
            return cl.replace(extra={**cl.extra, "ratio": ratios(cl, data)})
        return cl

    def task_mask(cl, t):
        return vm.mask(*variational(cl, t), s["threshold"])

    def end_task(cl, data: TaskData):
        cons = consolidation.consolidate(cl.extra["consolidated"], task_mask(cl, data.t))
        cl = cl.replace(extra={**cl.extra, "consolidated": cons})
        if bn == "refresh":
            cl = consolidation.refresh_task(cl, ctx, refresh, test_weights(cl, data.t), data.t, data.x,
                                            data.batch_size)
        return cl

    def report(cl):
        return consolidation.capacity_report([task_mask(cl, t) for t in range(T)])

    return Method("ibm", init, loss, predict, begin_task=begin_task, end_task=end_task,
                  update_mask=consolidation.update_mask, end_epoch=end_epoch, evaluates_unseen=False,
                  report=report)
