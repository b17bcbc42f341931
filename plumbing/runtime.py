# plumbing/runtime.py: a transition shim, deleted once train_nlu.py, train_nlg.py and their tests import the
# modules below themselves (/tmp/plumbing_renames.sed rewrites them): the names those four files use as runtime.X,
# re-exported from where they now live. No logic of its own but read_json's one line for train_nlg's old call.

import balora
from balora import write_json  # noqa: F401
from plumbing.checkpoints import (  # noqa: F401
    CHECKPOINT, RESUME_MAY_CHANGE, Interrupted, checkpoint_state, checkpoint_step,
    fingerprints, load_checkpoint, save_checkpoint)
from plumbing.devices import autocast, cpu_bf16_native, machine, pick_device, resolve_dtype, setup  # noqa: F401
from plumbing.errors import InputError, NonFiniteLoss, check_finite_metrics, cli, leave  # noqa: F401
from plumbing.flags import arg_range, check_shared, shared_args  # noqa: F401
from plumbing.parallel import Dist, all_sum, check_world, data_parallel, step_seed, sync_gradients  # noqa: F401
from plumbing.progress import fmt_time, step_line  # noqa: F401
from plumbing.rundir import LOCK, new_run_dir, open_log, run_dir, unlock_run_dir, write_jsonl  # noqa: F401


def read_json(path, what="JSON"):  # train_nlg.base_metrics's runtime.read_json(path, "metrics JSON")
    return balora.read_json(path, InputError)
