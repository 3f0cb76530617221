"""The H-embedding-guided hypernetwork protocol (Wu et al., arXiv 2502.11609, Table 1 / Fig. 3):
a ResNet-32 target generated whole by a chunked hypernetwork (chunks of 7000, task and chunk
embeddings of 32), beta = 0.05, H-embeddings from 1000 samples, Adam lr 5e-4, 100 epochs, batch 32,
TIL.

    python experiments/hembed_cifar.py --workdir runs/hembed-cifar
    python experiments/hembed_cifar.py --set hembed.guidance=none     # the HNET baseline
    python experiments/hembed_cifar.py --set hembed.guidance=random   # the random-embedding ablation

The paper streams CIFAR-10 (one task) then CIFAR-100 splits; clax registers the CIFAR-100 splits
(``split-cifar100``, 10 tasks of 10 classes), which this config uses until a combined CIFAR-10/100
stream is registered. Expected: ACC well above HNET's and BWT near 0 (the paper reports gains of a
few points of ACC over HNET on CIFAR). Not run here (needs the CIFAR data and a GPU); the same config
runs at tiny scale on the offline digits in tests/test_hnet.py.
"""
from clax.config import default_config


def get_config() -> dict:
    cfg = default_config("hembed", "split-cifar100")
    cfg["scenario"] = "til"
    cfg["backbone"] = {"name": "resnet32", "nf": 16}
    cfg["train"].update(epochs=100, batch_size=32, optimizer="adam", lr=5e-4)
    cfg["hembed"].update(chunk_size=7000, task_emb_dim=32, chunk_emb_dim=32, beta=0.05, guidance="h",
                         hscore_samples=1000, solve_steps=2000, solve_lr=1e-3, decoder_hidden=512)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
