"""An evaluation harness, unchanged, scores SmolLM2 through the swarm's API and gets local transformers' numbers.

EleutherAI's lm-evaluation-harness runs a small multiple-choice task twice in the same run:
- through the swarm: `--model local-completions` against `swarmllm api` (its `/v1/completions` with echo,
  logprobs and token-id prompts), over a loopback swarm of 2 servers;
- locally: `--model hf` on the same weights (the baseline).
It prints the accuracy of each, the largest per-choice log-likelihood difference (exit 1 past 1e-3 or on
any disagreement in which choice wins), and the swarm's time as a ratio to local.

The harness is not a project dependency (it pulls in datasets, pandas, scikit-learn...): install it into
any folder and name it, e.g. `pip install --target /tmp/lm_eval_pkgs lm_eval` then
`LM_EVAL_PATH=/tmp/lm_eval_pkgs python bench/eval_harness.py`. The task's data is written by this script
(arithmetic questions), so nothing is downloaded.

Usage: LM_EVAL_PATH=DIR python bench/eval_harness.py [--questions 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"
TASK = "swarmllm_arithmetic"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return p.parse_args()


def write_task(folder: Path, n: int) -> None:
    rng = random.Random(0)
    with open(folder / "data.jsonl", "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            right = a + b
            wrong = rng.sample([x for x in range(right - 5, right + 6) if x != right and x > 0], 3)
            choices = [str(c) for c in [right, *wrong]]
            rng.shuffle(choices)
            # (lm_eval puts a space between the question's text and each choice)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "choices": choices,
                                "answer": choices.index(str(right))}) + "\n")
    (folder / "task.yaml").write_text(TASK_YAML.format(task=TASK, data=folder / "data.jsonl"))


def harness(model: str, model_args: str, folder: Path, out: str, threads: int) -> tuple[dict, list[dict], float]:
    """Run lm_eval; returns (the task's results, its logged samples, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.environ["LM_EVAL_PATH"], "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                          "--tasks", TASK, "--include_path", str(folder), "--device", "cpu", "--batch_size", "1",
                          "--output_path", str(folder / out), "--log_samples"],
                         env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"lm_eval --model {model} failed:\n{run.stderr[-4000:]}")
    results = json.loads(next((folder / out).rglob("results_*.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in next((folder / out).rglob(f"samples_{TASK}_*.jsonl")).open()]
    return results, sorted(samples, key=lambda s: s["doc_id"]), seconds


def loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per question, each choice's log-likelihood."""
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def run(args: argparse.Namespace) -> dict:
    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.api.config import ApiConfig
    from swarmllm.api.serve import ApiServer, swarm_engine
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.source import resolve_model

    model_dir = resolve_model("smollm2")
    folder = Path(tempfile.mkdtemp(prefix="swarmllm-eval-"))
    write_task(folder, args.questions)
    local_results, local_samples, local_s = harness(
        "hf", f"pretrained={model_dir},dtype=float32", folder, "local", args.threads)
    with LocalSwarm(str(model_dir), [ServerSpec("0:15"), ServerSpec("15:30")], threads=args.threads) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=swarm.initial_peers,
                                                                num_threads=args.threads)
        api = ApiServer(swarm_engine(ApiConfig(model=str(model_dir), port=0), model.sequence_manager.config,
                                     model=model)).start()
        try:
            swarm_args = (f"model={api.engine.model_id},base_url={api.url}/v1/completions,tokenizer={model_dir},"
                          "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1")
            swarm_results, swarm_samples, swarm_s = harness("local-completions", swarm_args, folder, "swarm",
                                                            args.threads)
        finally:
            api.stop()
            model.sequence_manager.shutdown()
    local_ll, swarm_ll = loglikelihoods(local_samples), loglikelihoods(swarm_samples)
    diff = max(abs(a - b) for la, sa in zip(local_ll, swarm_ll) for a, b in zip(la, sa))
    picks_agree = all(la.index(max(la)) == sa.index(max(sa)) for la, sa in zip(local_ll, swarm_ll))
    return {
        "questions": args.questions, "choices_scored": sum(len(x) for x in swarm_ll),
        "swarm_acc": swarm_results["acc,none"], "local_acc": local_results["acc,none"],
        "max_loglikelihood_diff": diff, "picks_agree": picks_agree,
        "swarm_s": round(swarm_s, 1), "local_s": round(local_s, 1), "time_ratio": round(swarm_s / local_s, 2),
        "threads": args.threads,
    }


def main() -> int:
    if not os.environ.get("LM_EVAL_PATH"):
        print("set LM_EVAL_PATH to a folder holding lm_eval (pip install --target DIR lm_eval); see the docstring",
              file=sys.stderr)
        return 2
    args = parse_args()
    prepare()
    r = run(args)
    print(f"lm-evaluation-harness, {r['questions']} questions ({r['choices_scored']} choices scored): "
          f"accuracy swarm {r['swarm_acc']:.3f}, local {r['local_acc']:.3f}; largest log-likelihood difference "
          f"{r['max_loglikelihood_diff']:.2e}; picks {'agree' if r['picks_agree'] else 'DISAGREE'}")
    print(f"time: swarm {r['swarm_s']} s, local {r['local_s']} s ({r['time_ratio']}x; both include lm_eval's start)")
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "eval_harness": r}, indent=2) + "\n")
    return 0 if r["picks_agree"] and r["max_loglikelihood_diff"] < 1e-3 and r["swarm_acc"] == r["local_acc"] else 1


if __name__ == "__main__":
    sys.exit(main())
