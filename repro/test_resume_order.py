"""ordered.py / README Reproducibility: "Tune saves its trial list and the searcher's state as separate files ... a
driver killed during that upload can leave them out of step. The resumed sweep then follows Tune's trial list, logs a
warning, and may differ from an uninterrupted run." BatchSearcher.confirm records a trial the saved searcher lacks
only when `tag_number == len(self.records)`, i.e. only if Tune adds the restored trials in number order. Ray Tune 2.60
re-adds them sorted by the time of their last result, newest first (TuneController._requeue_restored_trials). So
when two trials the saved searcher lacks have both reported, the newer-numbered one reporting last, the latter is
never recorded: the searcher suggests its slot again, and the resumed sweep runs num_samples + 1 trials, one of
them a duplicate config the searcher and the scheduler know nothing of (never early-stopped, never told to TPE).

Drives the real BatchSearcher and OrderedScheduler through Ray Tune's own requeue function; the trials are stand-ins
with Tune's run metadata (no Ray)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from ray.tune import ResumeConfig
from ray.tune.execution.tune_controller import TuneController
from ray.tune.trainable.metadata import _TrainingRunMetadata

from lorahpo.ordered import OrderedScheduler
from tests.test_ordered import cfg_for, eager_searcher


class StandIn:
    """What _requeue_restored_trials and OrderedScheduler.on_trial_add read of a restored Tune trial."""

    def __init__(self, n: int, params: dict, status: str, reported_at: float | None):
        self.trial_id, self.experiment_tag, self.config, self.status = f"t{n}", f"{n + 1}_x", params, status
        self.run_metadata = _TrainingRunMetadata()
        if reported_at is not None:
            self.run_metadata.last_result_time = reported_at

    def set_status(self, status: str) -> None:
        self.status = status

    def init_local_path(self) -> None:
        pass


def test_trials_the_saved_searcher_lacks_are_all_recorded_on_resume() -> None:
    cfg = cfg_for(**{"sweep.num_samples": 8, "sweep.trials_per_batch": 2, "sweep.points_to_evaluate": "[]"})
    a = eager_searcher(cfg)
    params = {}
    for n in range(2):
        params[n] = a.suggest(f"t{n}")
        a.confirm(f"t{n}", params[n], n, live=True)
    saved = pickle.dumps(a.get_state())  # the searcher file that reached storage: trials 0-1
    for n in (2, 3):  # suggested and started after it; Tune's trial list (uploaded) has them
        params[n] = a.suggest(f"t{n}")
        a.confirm(f"t{n}", params[n], n, live=True)

    b = eager_searcher(cfg)  # the resumed driver
    b.set_state(pickle.loads(saved))  # TuneController.resume: the search algorithm is restored first, then the trials
    scheduler = OrderedScheduler(cfg, b)
    # trials 0-1 reported long ago; 2 and 3 both reported their first epoch, 3 a moment after 2
    trials = [StandIn(0, params[0], "RUNNING", 100.0), StandIn(1, params[1], "RUNNING", 101.0),
              StandIn(2, params[2], "RUNNING", 200.0), StandIn(3, params[3], "RUNNING", 201.0)]  # fmt: skip
    controller = SimpleNamespace(add_trial=lambda trial: scheduler.on_trial_add(controller, trial))
    TuneController._requeue_restored_trials(controller, trials, ResumeConfig(unfinished=ResumeConfig.ResumeType.RESUME))

    unknown = [t.trial_id for t in trials if t.trial_id not in b.index]
    again = b.suggest("t_new")
    assert not unknown, (
        f"Tune runs {unknown} but the searcher never recorded it; its next suggestion repeats trial 3's config: "
        f"{again == params[3]}"
    )
