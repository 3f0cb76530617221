"""The H-embedding-guided hypernetwork protocol (Wu et al., arXiv 2502.11609, NeurIPS 2025; its CIFAR
table and figures: CIFAR-10 then CIFAR-100 splits, TIL), as the authors' code runs it
(viki760/H-embedding_guided_hypernet-for-review- ``cifar/run_resnet.sh`` with the defaults of
``cifar/train_args.py`` for ``resnet_cifar``):

* stream ``cifar10-cifar100``: 11 tasks, CIFAR-10 (task 0) then 10 CIFAR-100 splits of 10 classes in
  natural class order (``data.class_order=natural``; ``data/special/split_cifar.py``), ImageNet mean/std
  for both parts, random flip and 4-pixel-padded crop on training images, no validation split;
* a ResNet-32 target generated whole by a LINEAR chunked hypernetwork (``hembed.hidden=[]``, their
  ``--hnet_arch=''``; chunks of 7000, task and chunk embeddings of 32);
* the output regulariser (beta 0.05) after a lookahead by the optimizer's own step
  (``hembed.lookahead=true``, ``hembed.lookahead_step=optimizer``: their ``calc_delta_theta`` of Adam);
* H-embeddings from 1000 samples, the solve's 2000 Adam steps at 1e-3, the decoder (hidden 512) at 1e-3;
* Adam lr 5e-4, 100 epochs, batch 32, lr x0.1 from epoch 81 (``train.lr_schedule=step:81:0.1``: their
  ``--lambda_lr_scheduler`` multiplies the rate by 0.1 once ``epoch > 80``).

    python experiments/hembed_cifar.py --workdir runs/hembed-cifar --set data_dir=$HOME/tensorflow_datasets
    python experiments/hembed_cifar.py --set hembed.guidance=none     # the HNET baseline
    python experiments/hembed_cifar.py --set hembed.guidance=random   # the random-embedding ablation

(``data_dir``: TFDS cifar10 and cifar100 prepared as array_record, see :mod:`clax.data.tfds`.)

Known deviations from the authors' run (docs/PROTOCOLS.md, "hembed", has the table):

* Their ``--plateau_lr_scheduler`` (factor sqrt(0.1) on the TEST accuracy, patience 5) is also on, but
  their LambdaLR rewrites the rate from its base every epoch right after it, so it never changes the
  rate; clax leaves it out (and never looks at the test set while training).
* Their hypernetwork starts from Xavier-uniform weights and no output affine; clax's from LeCun-normal
  weights with a per-leaf affine that puts the generated weights at the target's initial scale
  (:func:`clax.transforms.hypernet.layout`). Task and chunk embeddings are N(0, 1) in both.
* Their regulariser leaves out the output-layer rows of other tasks' heads (a 110-way multi-head
  output); clax's target has one 10-way head per generated network, all of it regularised.
* Their lookahead step reads the gradient after the H-embedding loss's backward pass, so from the
  third task on it includes that loss's gradient on the chunk embeddings; clax's is the task loss's alone.
* Their H-scores read the 1000 samples unnormalised ([0, 1] pixels, no augmentation) through each earlier
  task's network in training mode (BatchNorm on the samples' batch statistics); clax's read them as
  training batches are (normalised, augmented) in eval mode (each task's stored BatchNorm statistics).

Expected: the paper reports the H-embedding run a few points of ACC above HNET on this stream, with BWT
near 0. Not run here (needs the CIFAR data and a GPU); the same config runs at tiny scale on the
offline digits in tests/test_hnet.py.
"""
from clax.config import default_config

#: the stream's registry name
STREAM = "cifar10-cifar100"


def get_config() -> dict:
    """The H-embedding paper's CIFAR-10 + CIFAR-100 protocol as the authors run it (see the module docstring)."""
    cfg = default_config("hembed", "split-cifar100")
    cfg["benchmark"] = STREAM
    cfg["scenario"] = "til"
    cfg["backbone"] = {"name": "resnet32", "nf": 16}
    cfg["data"] = {**cfg.get("data", {}), "class_order": "natural"}
    cfg["train"].update(epochs=100, batch_size=32, optimizer="adam", lr=5e-4, lr_schedule="step:81:0.1")
    cfg["hembed"].update(chunk_size=7000, task_emb_dim=32, chunk_emb_dim=32, hidden=[], beta=0.05,
                         lookahead=True, lookahead_step="optimizer", guidance="h", hscore_samples=1000,
                         solve_steps=2000, solve_lr=1e-3, decoder_hidden=512, decoder_lr=1e-3, emb_std=1.0)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
