"""Write steps.json: three short runs' step records and final weights, by engine version 1.

Run from a checkout of zo a36c17c (the last version-1 engine):
``python make_steps.py /path/to/that/checkout steps.json``.
"""

import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
from estimators import ZOSGD  # noqa: E402
from estimators.zo_adam import ZOAdam  # noqa: E402
from tests.test_engine import IDS, TiedLM  # noqa: E402
from zo.engine import EngineConfig  # noqa: E402


def lm_loss(model):
    logits = model(IDS)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)
    )


def as_bits(tensor):
    integer = torch.int16 if tensor.element_size() == 2 else torch.int32
    return tensor.detach().contiguous().view(-1).view(integer).tolist()


CASES = [
    (
        "zo_sgd_fp32",
        ZOSGD,
        torch.float32,
        {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01, "queries": 2, "seed": 9},
    ),
    ("zo_sgd_bf16", ZOSGD, torch.bfloat16, {"lr": 1e-2, "eps": 1e-2, "queries": 1, "seed": 3}),
    ("zo_adam_fp32", ZOAdam, torch.float32, {"lr": 1e-3, "eps": 1e-3, "queries": 2, "seed": 5}),
]


def main() -> None:
    cases = {}
    for name, estimator, dtype, kwargs in CASES:
        model = TiedLM().to(dtype)
        engine = EngineConfig(chunk_size=48, threads=2)
        optimizer = estimator(model.parameters(), engine=engine, **kwargs)
        records = []
        for _ in range(3):
            optimizer.step(lambda model=model: lm_loss(model).float())
            records.append(optimizer.last_record.to_dict())
        cases[name] = {
            "estimator": estimator.__name__,
            "dtype": str(dtype).replace("torch.", ""),
            "kwargs": kwargs,
            "engine": {"chunk_size": 48},
            "records": records,
            "weights": {n: as_bits(p) for n, p in model.named_parameters()},
        }
    with open(sys.argv[2], "w") as handle:
        json.dump(cases, handle)


if __name__ == "__main__":
    main()
