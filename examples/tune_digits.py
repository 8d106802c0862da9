"""A Ray Tune sweep over the digits job, where every trial is a 2-worker distributed Trainer.

    python examples/tune_digits.py --num-samples 8

ASHA stops weak trials early; ``--pbt`` runs PopulationBasedTraining instead, whose trials
continue from the checkpoints of better ones. The only raylight piece is
``raylight.tune.resources``, which tells Tune what a trial's workers need: the Trainer
reports to Tune by itself. Prints the best config and its test accuracy.
"""

import argparse
import os
import sys

from ray import cloudpickle, tune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the digits example's classes

import digits  # noqa: E402
from digits import DigitsDataModule, DigitsModel  # noqa: E402

import raylight as pl  # noqa: E402
from raylight.tune import CHECKPOINT_NAME, init_ray, resources  # noqa: E402

# Tune's trial processes do not have this folder on their path: ship the classes with the
# trainable instead of by module name.
cloudpickle.register_pickle_by_value(digits)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8, help="trials")
    parser.add_argument("--num-workers", type=int, default=2, help="workers per trial")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--pbt", action="store_true", help="PopulationBasedTraining, not ASHA")
    parser.add_argument(
        "--default-root-dir",
        "--storage-path",
        default=os.path.abspath("tune_results"),
        help="Tune's storage: a path or storage URI (s3://, gs://) that every node reaches",
    )
    parser.add_argument(
        "--ckpt-path",
        default=None,
        help="resume the sweep saved there (<default-root-dir>/tune_digits) instead of a new one",
    )
    return parser.parse_args(argv)


def _scheduler(args: argparse.Namespace) -> tune.schedulers.TrialScheduler:
    if args.pbt:
        return tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=2,
            hyperparam_mutations={"lr": tune.loguniform(1e-3, 1e-1)},
        )
    return tune.schedulers.ASHAScheduler(max_t=args.max_epochs, grace_period=2)


def main(argv: list[str] | None = None) -> float:
    args = _parse_args(argv)
    init_ray(args.num_workers)  # RAY_ADDRESS, a `ray start` cluster here, else a local Ray

    def train_fn(config):
        trainer = pl.Trainer(
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            max_epochs=args.max_epochs,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(DigitsModel(lr=config["lr"]), DigitsDataModule(batch_size=config["batch_size"]))

    trainable = tune.with_resources(
        train_fn, resources(num_workers=args.num_workers, use_gpu=args.use_gpu)
    )
    if args.ckpt_path:  # an interrupted sweep: unfinished trials go on from their checkpoints
        tuner = tune.Tuner.restore(args.ckpt_path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"lr": tune.loguniform(1e-3, 1e-1), "batch_size": tune.choice([32, 64])},
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=args.num_samples,
                scheduler=_scheduler(args),
            ),
            run_config=tune.RunConfig(storage_path=args.default_root_dir, name="tune_digits"),
        )
    best = tuner.fit().get_best_result()
    print(f"best config: {best.config}")
    with best.checkpoint.as_directory() as folder:
        model = DigitsModel.load_from_checkpoint(os.path.join(folder, CHECKPOINT_NAME))
    trainer = pl.Trainer(num_workers=args.num_workers, logger=False, enable_progress_bar=False)
    (results,) = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)
    accuracy = results["test_acc"]
    print(f"test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
