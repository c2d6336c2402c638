"""Writes the old-format XGBoost fixtures of tests/test_legacy.py into a folder named after
the running xgboost version. Run it under each old version in a venv of its own, e.g.

    python -m venv /tmp/x090 && /tmp/x090/bin/pip install xgboost==0.90 'numpy<1.25' 'scipy<1.12'
    /tmp/x090/bin/python tests/data/legacy/make_fixtures.py

(0.90: SageMaker's 0.90 containers, which pickled the Booster; 1.0.2: the 1.0 container, a
pickle holding a CONFIG-offset snapshot; 1.7.6: binary save_model and a UBJSON snapshot).
"""

import ast
import pickle
from pathlib import Path

import numpy as np
import xgboost as xgb

out = Path(__file__).parent / ("xgboost-" + xgb.__version__)
out.mkdir(exist_ok=True)
rng = np.random.RandomState(0)
x = rng.randint(0, 256, (3000, 3)).astype(np.float32)
y = ((x[:, 0] > 1.3 * x[:, 1]) & (x[:, 0] > 90)).astype(int)
train = xgb.DMatrix(x, label=y)
aws_payload = {  # export.train.AWS_PAYLOAD, read as text: the project is not installed here
    **next(
        ast.literal_eval(node.value)
        for node in ast.parse(
            Path(__file__).parents[3].joinpath("export", "train.py").read_text()
        ).body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "AWS_PAYLOAD"
    ),
    "seed": 0,
}
softmax = xgb.train({k: v for k, v in aws_payload.items() if k != "num_round"}, train, 6)
logistic = xgb.train(
    {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "seed": 0, "base_score": 0.3},
    train,
    5,
)
for name, booster in (("softmax", softmax), ("logistic", logistic)):
    booster.save_model(str(out / (name + ".bin")))  # no .json suffix: the binary format
    with open(str(out / (name + ".pkl")), "wb") as f:
        pickle.dump(booster, f)
colours = rng.randint(0, 256, (400, 3)).astype(np.uint8)
probe = xgb.DMatrix(colours.astype(np.float32))
np.savez(
    str(out / "expected.npz"),
    colours=colours,
    softmax_margin=softmax.predict(probe, output_margin=True),
    logistic_probability=logistic.predict(probe),
)
print(out)
