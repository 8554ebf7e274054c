"""Putting a training run on the Hugging Face Hub: its model card at the end of training, the upload of the finished
run with --push_to_hub, and with --hub_push_checkpoints the upload of every resumable checkpoint as it is saved.

A training script builds the checkpoint uploader in its `main` and passes it on, to every checkpoint save and then
to the end of the run:

    pusher = checkpoint_pusher(args)   # None without --hub_push_checkpoints
    save_checkpoint(accelerator, args.output_dir, step, keep, after_save=pusher)
    publish_run(args, accelerator, "train_ssl.py", pusher)

Using a run as a model (loading, encoding, save_pretrained / push_to_hub) is mrl/pretrained.py; what the card says
is mrl/hub/model_card.py.
"""

import os
import shlex
import sys

from huggingface_hub import HfApi

from mrl import UserError
from mrl.hub.model_card import write_card
from mrl.pretrained import MatryoshkaEncoder
from mrl.run_folder.layout import CHECKPOINTS
from mrl.utils import hub_access


def hub_repo_id(args):
    """The run's model repo: --hub_model_id, else the --output_dir folder's name (under the token's user)."""
    return args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))


def training_command(script):
    """The command line that started this process, when it ran `script` (None when called from other code)."""
    if os.path.basename(sys.argv[0]) != script:
        return None
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch` for the processes it starts
        launcher = "accelerate launch"
    elif "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's
        launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', 1)}"
    else:
        launcher = "python"
    return f"{launcher} {shlex.join([script, *sys.argv[1:]])}"


def publish_run(args, accelerator, script, pusher=None):
    """After a training script saved its model and metrics: write the run's model card, and with --push_to_hub
    upload the run, after the checkpoint uploads of `pusher` (what `checkpoint_pusher` returned) still running.
    Main process only; an upload that fails raises a one-line UserError and leaves the run folder as it is."""
    if not accelerator.is_main_process:
        return
    repo_id = hub_repo_id(args)
    command = training_command(script)
    if command and accelerator.num_processes > 1:
        command += f"   # on {accelerator.num_processes} processes"
    card = write_card(args.output_dir, command, repo_id if args.push_to_hub else None)
    print(f"saved the model card {card}")
    if not args.push_to_hub:
        return
    if pusher is not None:
        pusher.wait()
    hint = (f"the run is saved in {args.output_dir}; upload it later with: python -c \"from mrl.pretrained import "
            f"MatryoshkaEncoder; MatryoshkaEncoder.from_pretrained('{args.output_dir}').push_to_hub('{repo_id}')\"")
    try:
        model = MatryoshkaEncoder.from_pretrained(args.output_dir, device="cpu")
        url = model.push_to_hub(repo_id, private=args.hub_private or None, commit_message="End of training")
    except UserError as e:
        raise UserError(f"{e}; {hint}") from None
    print(f"pushed {args.output_dir} to the Hub: {url}")


class CheckpointPusher:
    """--hub_push_checkpoints: after each checkpoint is saved, upload it in the background to `checkpoints/` of the
    run's Hub repo, replacing the one uploaded before (as transformers' hub_strategy="checkpoint"), so a preempted
    run can resume on another machine: download `checkpoints/` into its --output_dir and pass
    --resume_from_checkpoint latest. A failed upload is reported and training goes on."""

    def __init__(self, output_dir, repo_id, private):
        self.output_dir, self.repo_id, self.private = output_dir, repo_id, private
        self.api, self.created, self.pending = HfApi(), None, []

    def __call__(self, checkpoint):
        name = os.path.basename(checkpoint)
        problem = hub_access.hub_unreachable()
        if problem:
            print(f"warning: checkpoint {name} not pushed: {problem}", file=sys.stderr)
            return
        try:
            if self.created is None:
                self.created = self.api.create_repo(self.repo_id, private=self.private or None, exist_ok=True).repo_id
            future = self.api.upload_folder(
                repo_id=self.created, folder_path=os.path.join(self.output_dir, CHECKPOINTS), path_in_repo=CHECKPOINTS,
                allow_patterns=[f"{name}/*"], delete_patterns=["*"], commit_message=f"Training in progress, {name}",
                run_as_future=True)
        except Exception as e:
            print(f"warning: checkpoint {name} not pushed: {hub_access.one_line(e)}", file=sys.stderr)
            return
        future.add_done_callback(lambda f: f.exception() and print(
            f"warning: checkpoint {name} not pushed: {hub_access.one_line(f.exception())}", file=sys.stderr))
        self.pending.append(future)

    def wait(self):
        for future in self.pending:
            future.exception()  # waits; failures were reported by the callback


def checkpoint_pusher(args):
    """The `after_save` of save_checkpoint that --hub_push_checkpoints asks for (a CheckpointPusher), or None.
    Built once in a training script's main, after resolve_run_args checked the Hub flags and the token."""
    if not args.hub_push_checkpoints:
        return None
    return CheckpointPusher(args.output_dir, hub_repo_id(args), args.hub_private)


def resolve_hub_args(args):
    """Check the Hub flags at the start, not after hours of training."""
    if not args.push_to_hub:
        given = [f"--{name}" for name in ("hub_model_id", "hub_private", "hub_push_checkpoints") if getattr(args, name)]
        if given:
            raise UserError(f"{', '.join(given)} need --push_to_hub")
        return
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
