"""Fine-tune evaluator: the subset training stream (filtering, epochs, determinism), and end-to-end training
on the synthetic run (keys, ranges, same subsets as the linear probe, the loss falls, the run is untouched)."""
import jax
import numpy as np

from tests.evaluators.conftest import eval_cfg


def test_train_stream_covers_subset_each_epoch(syn_run, syn_data):
    from medvlp_jax.data.fields import read_split_fields
    from medvlp_jax.evaluators import eval_config, finetune
    config = eval_config(syn_run, eval_cfg())
    subset = np.array([1, 5, 6, 9, 12, 20, 21, 30, 33, 40, 41, 47, 50, 55, 60, 63])

    def first(n):
        it = finetune.train_stream(config.data, "train", subset, local_batch=8, seed=1).as_numpy_iterator()
        return [next(it) for _ in range(n)]

    a, b = first(4), first(4)
    for x, y in zip(a, b):                                              # deterministic
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
    epoch1 = np.concatenate([x["index"] for x in a[:2]])
    epoch2 = np.concatenate([x["index"] for x in a[2:]])
    assert sorted(epoch1) == sorted(subset) == sorted(epoch2)           # each epoch = the subset, once
    assert not np.array_equal(epoch1, epoch2)                            # reshuffled
    stored = read_split_fields(syn_data, "train", ("index", "labels"))
    np.testing.assert_array_equal(a[0]["labels"], stored["labels"][a[0]["index"]])
    assert a[0]["image"].shape == (8, config.data.crop, config.data.crop, config.data.channels)
    assert a[0]["image"].min() >= -1 and a[0]["image"].max() <= 1


def test_image_variables_are_the_image_tower(syn_run):
    from medvlp_jax.evaluators import finetune
    iv = finetune.image_variables(syn_run)
    assert iv["params"] is syn_run.variables["params"]["image"]


def test_evaluate_on_synthetic_run(syn_run):
    from medvlp_jax.data.fields import read_split_fields
    from medvlp_jax.evaluators import get, linear_probe as lp
    before = jax.tree.map(np.asarray, syn_run.variables["params"]["image"])
    cfg = eval_cfg(fractions=(0.1, 1.0), lr=2e-3, weight_decay=1e-4, epochs=3, patience=3, task="auto", seed=5)
    res = get("finetune")(syn_run, cfg)
    assert res["protocol/task"] == "multilabel" and res["protocol/seed"] == 5
    assert res["protocol/n_train"] == 64 and res["protocol/n_val"] == 16 and res["protocol/n_test"] == 32
    for name, f in (("10%", 0.1), ("100%", 1.0)):
        assert res[f"protocol/{name}/n_train"] == lp.fraction_size(64, f)
        assert 0 <= res[f"{name}/macro_auroc"] <= 1 and 0 <= res[f"{name}/val_macro_auroc"] <= 1
        assert 1 <= res[f"protocol/{name}/best_epoch"] <= res[f"protocol/{name}/epochs_run"] <= 3
    assert res["protocol/10%/steps_per_epoch"] == 1 and res["protocol/100%/steps_per_epoch"] == 8
    # Same labelled examples as the linear probe with the same seed.
    stored = read_split_fields(syn_run.config.data.root, "train", ("index", "labels"))
    subset = lp.label_fraction_subsets(64, (0.1,), 5)[0.1]
    assert res["protocol/10%/positives"] == ", ".join(str(int(v)) for v in (stored["labels"][subset] > 0).sum(0))
    # Training does something: the training loss falls over the epochs (100%, 8 steps per epoch).
    losses = [float(v) for v in res["protocol/100%/train_losses"].split(", ")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # The shared run is not modified by fine-tuning.
    after = jax.tree.map(np.asarray, syn_run.variables["params"]["image"])
    jax.tree.map(np.testing.assert_array_equal, before, after)
