"""InferenceJob status: what the operator and the agent write (docs/contract.md says who writes which field)."""

from __future__ import annotations

from kubeflash_api import schema as s

PHASES = ("Pending", "Scheduled", "Staging", "Running", "Succeeded", "Failed")
_TIME = {"fmt": "date-time"}
_COND_TYPE = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
              r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


def conditions(doc: str) -> s.Node:
    """metav1.Condition, as Kubernetes' own types spell it."""
    item = s.obj(
        "One condition (metav1.Condition).",
        ("type", s.string("The condition's type, e.g. Ready.", max_len=316, pattern=_COND_TYPE)),
        ("status", s.string("True, False or Unknown.", enum=("True", "False", "Unknown"))),
        ("observedGeneration", s.integer("The .metadata.generation the condition was set for.", lo=0, fmt="int64")),
        ("lastTransitionTime", s.string("When the status last changed.", **_TIME)),
        ("reason", s.string("A CamelCase reason for the last transition.", min_len=1, max_len=1024,
                            pattern=_REASON)),
        ("message", s.string("A human-readable message about the transition.", max_len=32768)),
        required=("type", "status", "lastTransitionTime", "reason", "message"))
    return s.array(doc, item, list_map_keys=("type",))


JOB_STATUS = s.obj(
    "What the job is doing, written by the operator (placement, phase) and the node agent (progress, timings).",
    ("phase", s.string("Pending, Scheduled, Staging, Running, Succeeded or Failed.", enum=PHASES)),
    ("reason", s.string("CamelCase reason of the current phase.", max_len=1024)),
    ("message", s.string("Why the job is in its phase, for people.", max_len=32768)),
    ("observedGeneration", s.integer("The spec generation the operator last acted on.", lo=0, fmt="int64")),
    ("modelId", s.string("The id the model is staged under on the node.")),
    ("node", s.string("The node the job is placed on.")),
    ("gpu", s.integer("The first GPU index of the job's pairs.")),
    ("gpus", s.array("Every GPU index the job holds.", s.integer("A GPU index."))),
    ("disk", s.string("The paired SSD's name (the job's KV space).")),
    ("modelDisk", s.string("The disk of the node that holds the staged model.")),
    ("staged", s.boolean("Whether the model is staged on the placed node.")),
    ("attempt", s.integer("Number of the current (last created) pod, <name>-<attempt>.", lo=0)),
    ("pod", s.string("The current attempt's pod.")),
    ("attempts", s.array("Finished attempts, oldest first.", s.obj(
        "One finished attempt.",
        ("attempt", s.integer("The attempt's number.")),
        ("pod", s.string("The attempt's pod.")),
        ("result", s.string("Succeeded or Failed.", enum=("Succeeded", "Failed"))),
        ("reason", s.string("Why it ended.")),
        ("message", s.string("What ended it, for people.")),
        ("finishedAt", s.string("When it ended.", **_TIME))))),
    ("retryAt", s.string("When the next attempt starts after a failure.", **_TIME)),
    ("scheduledTime", s.string("When the job was placed.", **_TIME)),
    ("stagedTime", s.string("When its model was ready on the node.", **_TIME)),
    ("startTime", s.string("When the first pod started.", **_TIME)),
    ("completionTime", s.string("When the job Succeeded or Failed.", **_TIME)),
    ("progress", s.obj(
        "Relayed by the node agent from the engine's progress.json.",
        ("promptsDone", s.integer("Prompts with a result.", lo=0)),
        ("promptsTotal", s.integer("Prompts in the job.", lo=0)),
        ("tokens", s.integer("Tokens generated so far.", lo=0)),
        ("summary", s.string('"<promptsDone>/<promptsTotal>", for kubectl.')),
        ("updated", s.string("When the engine last wrote progress.", **_TIME)))),
    ("throughput", s.obj(
        "Generated tokens per second.",
        ("tokensPerSecond", s.number("Over the whole run.")),
        ("prefillTokensPerSecond", s.number("Prompt tokens per second in the prefill.")),
        ("decodeTokensPerSecond", s.number("Generated tokens per second in the decode.")))),
    ("timings", s.mapping("FlexGen-style breakdown in seconds (load_weight, load_cache, store_cache, "
                          "compute_layer_prefill, …).", s.number("Seconds."))),
    ("refused", s.mapping("Files of the job's directory the node agent refused to read, file -> why (a link "
                          "planted by the pod, a FIFO, an oversized file); written by the agent. The operator fails "
                          "the job when its results.jsonl is refused.", s.string("Why the agent refused it."))),
    ("shards", s.obj(
        "A spec.parallelism job's shard jobs (<name>-s<k>) by phase; a summary that stays this size for any count.",
        ("total", s.integer("Shards of the job (spec.parallelism).", lo=0)),
        ("pending", s.integer("Shards not created yet or not running yet (Pending, Scheduled, Staging).", lo=0)),
        ("running", s.integer("Shards Running.", lo=0)),
        ("succeeded", s.integer("Shards Succeeded.", lo=0)),
        ("failed", s.integer("Shards Failed.", lo=0)))),
    ("conditions", conditions("Ready, Scheduled, Staged and Complete, as metav1.Conditions.")),
)
