"""The one settings object, read from the environment once at the process edge.

Every field has an environment variable of the same name in upper case (e.g.
``KAFKA_BOOTSTRAP_SERVERS``); secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class SettingsError(ValueError):
    """Settings that parse one by one but do not work together (e.g. SASL without a username)."""


class TopicSpec(BaseModel):
    """A topic's name, partition count and topic-level configs (Apache Kafka's names)."""

    name: str
    partitions: int = Field(ge=1)
    config: dict[str, str] = Field(default_factory=dict)


class Settings(BaseSettings):
    """Configuration of every process; see the README's Configuration table."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- Kafka connection: unset bootstrap servers means "start the embedded broker"
    kafka_bootstrap_servers: str | None = None
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_password: SecretStr | None = None
    # consumer-group session timeout: short, because the embedded broker holds a JoinGroup
    # for half of it (BROKER.md); raise it against a real cluster.
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    # at start-up each process retries reaching Kafka (exponential backoff) for at most this long,
    # then exits with one line and code 69
    kafka_connect_timeout_s: float = Field(default=30.0, gt=0)

    # --- topics (names and partition counts)
    topic_impressions: str = "impressions"
    topic_clicks: str = "clicks"
    topic_applications: str = "applications"
    topic_approvals: str = "approvals"
    topic_activations: str = "activations"
    topic_samples: str = "samples"
    topic_dead_letters: str = "dead-letters"
    topic_scores: str = "scores"
    topic_model_versions: str = "model-versions"
    event_partitions: int = Field(default=4, ge=1)
    samples_partitions: int = Field(default=4, ge=1)
    # how joiners write the samples topic: "msgpack" (compact binary, ~7x faster for the trainer's
    # feed to read) or "json" (readable with kcat). Trainers read both, mixed: switch the joiners
    # only once every trainer runs a version that reads msgpack (README: topics and schemas)
    samples_encoding: Literal["json", "msgpack"] = "msgpack"
    scores_partitions: int = Field(default=4, ge=1)
    topic_replication_factor: int = Field(default=1, ge=1)

    # --- local state
    data_dir: Path = Path(".data")

    # --- metrics: every process serves its own /metrics port, on loopback by default
    metrics_host: str = "127.0.0.1"
    metrics_port_broker: int = 9400
    metrics_port_simulator: int = 9401
    metrics_port_joiner: int = 9402
    metrics_port_trainer: int = 9403
    metrics_port_scorer: int = 9404
    scorer_http_host: str = "127.0.0.1"
    scorer_http_port: int = 8080
    prometheus_port: int = 9090

    # --- embedded broker
    embedded_broker_port: int = 9092

    # --- joiner (stream/join/app.py): event-time windows, emission policy, watermark; docs/joiner.md
    joiner_app_id: str = "aitm-joiner"
    joiner_policy: Literal["early", "matured"] = "early"
    # each task's window, from its predecessor's event time (the paper's T+14 for activation)
    joiner_window_click_ms: int = Field(default=3_600_000, gt=0)
    joiner_window_application_ms: int = Field(default=3 * 86_400_000, gt=0)
    joiner_window_approval_ms: int = Field(default=86_400_000, gt=0)
    joiner_window_activation_ms: int = Field(default=14 * 86_400_000, gt=0)
    # early policy: first sample this long (event time) after the impression
    joiner_observe_ms: int = Field(default=30 * 60_000, ge=0)
    # an event whose predecessor is missing is held until the predecessor's topic is this far
    # past it (event time), then it is illegal_sequence
    joiner_grace_ms: int = Field(default=10 * 60_000, ge=0)
    # a step stamped up to this long before its predecessor still counts (sources' clocks differ)
    joiner_clock_skew_ms: int = Field(default=5 * 60_000, ge=0)
    # allowed lateness of each event topic (event time): how far behind the newest records of
    # its own topic - or, while the topic is idle, behind the impressions - an event may arrive
    # and still count. Finals waiting for that topic wait that much longer. The impressions'
    # lateness delays first samples; partner feeds (an hourly approval export, a daily activation
    # file at 02:00) need hours and a day
    joiner_allowed_lateness_ms: int = Field(default=30 * 60_000, ge=0)
    joiner_allowed_lateness_ms_click: int = Field(default=30 * 60_000, ge=0)
    joiner_allowed_lateness_ms_application: int = Field(default=6 * 3_600_000, ge=0)
    joiner_allowed_lateness_ms_approval: int = Field(default=6 * 3_600_000, ge=0)
    joiner_allowed_lateness_ms_activation: int = Field(default=2 * 86_400_000, ge=0)
    # a topic read to its end that delivers nothing for this long (WALL time) is idle: its lane
    # follows the impressions less its lateness instead of waiting for it
    joiner_idle_timeout_ms: int = Field(default=30_000, ge=0)
    # events stamped more than this ahead of the joiner's wall clock go to dead-letters
    # ("future"); 0 turns the check off (simulated time, replays: their event times may run ahead)
    joiner_max_future_ms: int = Field(default=3_600_000, ge=0)
    # final funnels are kept this long so replays and after-window events are "late"
    joiner_retention_ms: int = Field(default=27 * 86_400_000, ge=0)
    # sweep the expiry index at most this often (wall time)
    joiner_sweep_interval_ms: int = Field(default=250, ge=0)
    # faust's recovery offset check: None = on against a real Kafka, off for the embedded
    # broker (its ListOffsets is wrong, see BROKER.md)
    joiner_recovery_consistency_check: bool | None = None
    # faust's own web server: 0 = off
    joiner_web_port: int = Field(default=0, ge=0)
    # the largest record batch the joiner's producer builds (aiokafka's max_batch_size); faust's
    # default, 16 KB, costs ~1.5-2 us more CPU per record (docs/joiner.md, round 8: 64 KB
    # measured best, 256 KB no better). Keep it under the broker's message.max.bytes.
    joiner_producer_max_batch_bytes: int = Field(default=65_536, ge=1024, le=1_000_000)
    # the join core's compiled common path (stream/join/fast.py) where it applies; off: the
    # Python core does it all (same results, for A/B measurements)
    joiner_fast_core: bool = True
    # the longest a fetch of the joiner's consumer waits at the broker for records (aiokafka's
    # fetch_max_wait_ms; faust hard-codes 1500). aiokafka keeps one fetch in flight per broker and
    # fetches the partitions whose records are read, so a long poll on caught-up partitions
    # stalls the reading of a backlog on the others (docs/joiner.md, round 15)
    joiner_fetch_max_wait_ms: int = Field(default=100, ge=1, le=30_000)
    # once started, move the objects made so far out of the garbage collector's full passes
    # (gc.freeze; stream/ops/heap.py): each pass traversed ~100k startup objects, 70-125 ms
    joiner_gc_freeze: bool = True
    # allocations between two collections of the garbage collector's youngest generation
    # (CPython: 700, a pass every few records; 0 keeps it); stream/ops/heap.py
    joiner_gc_young_threshold: int = Field(default=20_000, ge=0, le=10_000_000)
    # how long the joiner's busy thread keeps the GIL when another waits for it (CPython's switch
    # interval, 5 ms; 0 keeps it): faust's consumer thread needs it a few times per fetch response,
    # and waited up to 5 ms each time while the join held it - a fifth of the bench's window spent
    # waiting for fetches (docs/joiner.md, round 21)
    joiner_switch_interval_us: int = Field(default=500, ge=0, le=1_000_000)

    # --- trainer (stream/learn/trainer.py): test-then-train on samples; docs/streaming.md
    # delayed feedback: "fnw" (fake-negative weighting, trains at the first sample) or
    # "final-only" (trains on final, correct but late labels)
    trainer_mode: Literal["fnw", "final-only"] = "fnw"
    # batch 500, not the paper's offline 2000: online, each sample is seen once and a day of the
    # demo's traffic (10,000 impressions, ~20,000 samples) is only ~10 steps at 2000
    trainer_batch_size: int = Field(default=500, ge=1)
    # a partial batch is trained after this long without filling up (keeps freshness when idle)
    trainer_linger_ms: int = Field(default=500, ge=0)
    # Adam lr of the online updates. The best value falls as traffic grows (more steps a day):
    # replays of 21 days with drift, fnw, one pass, approval AUC after day 4 - at 4,000
    # impressions/day 0.836-0.837 at 3e-3 (3 seeds), 0.833 at 2e-3, 0.793 at 5e-3, 0.787-0.816
    # at 1e-2 (there a model frozen after 4 days scored 0.798-0.812); at 1,500/day (toy traffic,
    # ~6 steps a day) 1e-2 does best (0.80-0.82) and 3e-3 only 0.70. The default is for
    # 4,000/day and more: the demo's 10,000, and anything real. With TRAINER_LR_SCALE=volume (the
    # default) it is the rate at TRAINER_LR_REF_IMPRESSIONS a day, scaled to the measured volume
    trainer_lr: float = Field(default=0.003, gt=0)
    # "volume" (the default): the rate follows the stream's volume, TRAINER_LR x
    # (TRAINER_LR_REF_IMPRESSIONS / impressions a day) ^ TRAINER_LR_VOLUME_POWER within [0.25, 4] x
    # TRAINER_LR, the impressions counted once each by their earliest sample (a first, or a final
    # with no first: the joiner sends firsts for only some impressions when its lanes run ahead)
    # and averaged in event time over a day (TRAINER_LR itself during the first day); "fixed":
    # TRAINER_LR at every volume (stream/learn/lr_schedule.py; docs/models.md, "The learning rate
    # across volumes"). bench online, fixed -> volume: auc_final at 1,500/day +0.006-0.032 on every
    # step (AITM and ESMM, 3 seeds), at 4,000/day the same, at 20,000/day activation +0.022 (AITM)
    # / +0.035 (ESMM), live above frozen everywhere; bench serving replays (keep19, keep19b): the
    # served calibration and swing as fixed's (counting first samples only, the rate went to 2.7x)
    trainer_lr_scale: Literal["volume", "fixed"] = "volume"
    # impressions a day at which TRAINER_LR is the right rate (where 3e-3 was measured good)
    trainer_lr_ref_impressions: float = Field(default=4000.0, gt=0)
    # the power of (reference / volume) the rate follows: 0.5 from the tracking argument (drift
    # per step ~ 1/volume, noise per step constant); 1 keeps the distance moved per day of event
    # time constant. bench online (AITM, ESMM; 1,500 / 4,000 / 20,000 a day): at 0.5 AITM's live
    # activation stayed below its day-3 copy at 20,000 a day (0.8670 vs 0.8717); at 1 ESMM's
    # auc_final lost 0.004-0.006 on application / approval there; 0.75 beat frozen everywhere
    trainer_lr_volume_power: float = Field(default=0.75, ge=0, le=1)
    # weight of AITM's Behavioral Expectation Calibrator in the streaming trainer's loss (the paper's
    # alpha is 0.6). It is one-sided - max(p_t - p_(t-1), 0) only ever lowers a step and raises the
    # one before it - and where two steps' rates are close (activation ~0.8 x approval) a model
    # with any noise crosses that line on some rows even at the true rates, so it pulls the later
    # step's mean down: replays of the same samples served activation 10-15% lower late in the
    # stream at 0.6 than at 0, the version left serving 0.77 / 0.78 of the truth against 0.87 / 0.90
    # (docs/serving.md, fifth round). The served order does not rest on it: every row is projected
    # (aitm/projection.py). 0.6 restores the paper's loss
    trainer_calibrator_alpha: float = Field(default=0.0, ge=0)
    # how a cold-started model's dense layers start (aitm/layers.py DenseInit). "glorot" (Keras'
    # Dense, what the offline benches use) gains 0.005-0.007 AUC offline and online, but a replay
    # of the served scores (bench serving --replay) dropped the served activation calibration p05
    # 0.68 -> 0.57 realtime / 0.58 -> 0.44 batch feeds and raised its swing to 1.28 / 1.36 (issue
    # 19 wants >= 0.8 and <= 1.3): the served-score smoothing was tuned on "torch" (nn.Linear's
    # default), which the product keeps until it is re-tuned (docs/models.md)
    trainer_dense_init: Literal["glorot", "torch"] = "torch"
    # what AITM's task heads predict (aitm/model.py AITMHead): "joint", the paper's - each
    # end-to-end probability by its own sigmoid - or "conditional" - each head a step conditional,
    # p_t = p_(t-1) * sigmoid(c_t) as ESMM's, the funnel order held by construction (docs/models.md,
    # "The output parametrisation"). A checkpoint keeps the head it was trained with
    trainer_aitm_head: Literal["joint", "conditional"] = "conditional"
    # how AITM's task t takes in what task t-1 transfers (aitm/model.py AITMTransfer): "ait", the
    # paper's - z_t = AIT(q_t, p_(t-1)) - or "gated" - z_t = q_t + g_t * AIT(q_t, p_(t-1)), the
    # per-unit gate g_t at 0, so the model starts as per-task towers (with the conditional head
    # exactly ESMM) and opens the transfer as far as the loss asks (docs/models.md, "The transfer
    # as a gated residual"). A checkpoint keeps the transfer it was trained with
    trainer_aitm_transfer: Literal["ait", "gated"] = "gated"
    # shared experts under AITM's towers (aitm/model.py AITMConfig.experts): 0, the paper's - every
    # tower reads the embeddings - or E > 0 - the towers' first layers become E experts (MMoE's),
    # each task reading its own gated mixture (docs/models.md, "Shared experts under AITM's
    # towers": first offline in the adverse world, behind the default online at 4,000 a day). A
    # checkpoint keeps the shape it was trained with
    trainer_aitm_experts: int = Field(default=0, ge=0)
    # the transfer from task t-1 to task t without a backward path (aitm/model.py
    # AITMConfig.transfer_detach): task t reads z_(t-1) but its loss does not move task t-1's tower.
    # Online at 20,000 a day in the adverse world activation +0.0038 (5/5 seeds) over the paper's
    # backward path, level elsewhere and offline (docs/models.md, "The transfer without a backward
    # path"). A checkpoint keeps what it was trained with
    trainer_aitm_transfer_detach: bool = True
    # one forward pass per batch, with dropout off, both scores it (test) and carries the gradient
    # (train): a third less torch work. Online, each sample is seen once; dropout made no AUC
    # difference beyond seed noise (replay, docs/streaming.md). false: a scoring pass in eval
    # mode, then a training pass with the model's dropout
    trainer_one_pass: bool = True
    trainer_device: str = "auto"  # auto = cuda when present, else cpu
    # mixed precision on a GPU (stream/learn/device.py): bf16 autocast, or fp16 autocast with a
    # gradient scaler; off keeps fp32. Ignored (off) on CPU, where autocast only slows AITM down
    trainer_amp: Literal["off", "bf16", "fp16"] = "off"
    # torch intra-op threads on CPU. One: the trainer shares a small machine with the joiner, scorer
    # and broker, and its feed process needs a core; two OpenMP threads that lose a core to another
    # process wait on each other at every op (measured 4-10x slower on a loaded 2-core machine)
    trainer_threads: int = Field(default=1, ge=1)
    # a checkpoint (= a model version) every this many batches or seconds, whichever first
    trainer_checkpoint_batches: int = Field(default=200, ge=1)
    trainer_checkpoint_interval_ms: int = Field(default=3000, ge=100)
    # the training checkpoint (served and trained weights, optimizer, table, evaluators, holdout,
    # sample offsets: what a restart, a standby or a rank group resumes from) is written with the
    # version due after this many ms since the last one, and always at a clean stop; its own
    # cadence, because at millions of rows it is ~6 copies of the table. Samples consumed after
    # it are trained again after a kill -9 (their offsets are saved only with it). 0 = with every
    # version (the checkpoint then also serves encoders without a dynamic table, which have no
    # serving artifact: those always checkpoint every version)
    trainer_training_checkpoint_interval_ms: int = Field(default=60_000, ge=0)
    # keep a copy of the model frozen after this many days of impression event time (from the
    # first sample); it only scores, on the same final labels, for aitm_trainer_frozen_auc_ratio.
    # 0 = off
    trainer_freeze_after_days: float = Field(default=3.0, ge=0)
    # exact sliding evaluation window, in final-labelled predictions per task
    trainer_eval_window: int = Field(default=20_000, ge=10)
    # the dynamic embedding table (aitm/embedding_table.py, docs/embedding_table.md): one budget of
    # rows shared by every field (5 floats each, x4 with Adam's moments and the served average);
    # a value gets a row once seen this many times; a row not seen for the TTL (event time) is
    # given to a new value when the budget is full
    trainer_embedding_rows: int = Field(default=200_000, ge=1)
    trainer_feature_min_count: int = Field(default=10, ge=1, le=255)
    trainer_embedding_ttl_ms: int = Field(default=7 * 86_400_000, ge=1)
    # offline checkpoint (aitm.checkpoint format) to start from when the store is empty
    trainer_warm_start: Path | None = None
    # --- what keeps the served scores right and steady (docs/serving.md)
    # an optimizer step needs this many rows: a quiet stream gathers small batches (a real-time
    # trainer at a few thousand impressions a day would otherwise take a full Adam step per sample);
    # at bench speed, where batches are full, 1, 64 and 256 measured alike (docs/serving.md)
    trainer_min_step_rows: int = Field(default=64, ge=1)
    # late positives (corrections) are released at most at this multiple of their usual rate per
    # first sample, so a burst (a daily activation file, the tail after the last impression) is
    # spread over the impressions that follow it; 0 = at once (as before)
    trainer_positive_slack: float = Field(default=2.0, ge=0)
    # that usual rate: "seen" = late positives per first sample since the stream began (decayed);
    # "steady" = each first sample counted at the delay model's completeness G(age) of its moment
    # (a cold start's positives arrive at G of their steady rate, so the rate seen trails it and
    # the queue holds about a day of activations). "steady" drains that queue but, replayed on two
    # kept runs, lifted activation's p05 on one (0.68 -> 0.72) and lowered its median and raised
    # approval's p95 past 1.25 on the other: not the default (docs/serving.md, sixth round)
    trainer_positive_pace: Literal["steady", "seen"] = "seen"
    # the served model is an average of the trained weights with this half-life in trained rows
    # (about 0.4 days of rows at 4,000 impressions a day, 0.15 at 10,000); 0 = serve the trained
    # weights. 8,000, chosen before the served levels had the re-centring and the counted step
    # rates, served rankings 0.011-0.021 AUC below the live model's at 1,500-4,000 a day; 2,000
    # serves better scores on their own day, ranking and level (docs/serving.md, "The tenth round")
    trainer_ema_half_life_rows: float = Field(default=2000.0, ge=0)
    # a cold-started model's output biases start at the log-odds of these end-to-end rates (the
    # AITM paper's credit-card funnel); set your funnel's own, or [] to start at 0 (50%)
    trainer_prior_rates: list[float] = Field(default_factory=lambda: [0.2329, 0.0184, 0.0130, 0.0100])
    # the served average's output biases are re-centred, at each publication, so that its mean
    # prediction on this many recent impressions equals the live model's (an average of weights
    # lowers rare rates: docs/serving.md); 0 = off
    trainer_recentre_rows: int = Field(default=16384, ge=0)
    # cold-start delay compensation (stream/learn/delay_model.py): while the stream is younger than
    # a task's window, its positives arrive at G(age) of their steady rate, G the task's delay
    # distribution fitted on the positives so far. "serve": the served version's output biases are
    # raised by the completeness 1 / G of the positives behind the live model's recent predictions
    # (training untouched); "train": the positives are weighted by 1 / G(age) in training (lifted
    # activation's median in replays, but with daily activation files its last versions
    # over-predicted: p95 1.18 -> 1.29); "off". docs/serving.md. The factor is capped at the maximum
    trainer_delay_correction: Literal["off", "serve", "train"] = "serve"
    trainer_delay_max_factor: float = Field(default=3.0, ge=1)
    # the delay fit's window prior: each step's window (JOINER_WINDOW_<STEP>_MS) is taken to hold
    # this share of its delays, a weak prior that decides the tail a young stream cannot see yet
    # (docs/serving.md, fourth round); 0 = none (the third round's fit, applied from 30 positives)
    trainer_delay_window_quantile: float = Field(default=0.95, ge=0, lt=1)
    # ... and its strength: the sd of the window's z-score under the prior, smaller is stronger.
    # 0.75 (the fourth round's, about one positive's weight) let a cold start's fast first
    # activations fit a median of 1.3-1.4 days where the run's is 1.8-2.5; 0.25 lifted activation's
    # p05 in replays of two kept runs, 0.72 -> 0.85 / 0.81 realtime, 0.63 -> 0.67 batch-fed, nothing
    # else judged moving (docs/serving.md, seventh round)
    trainer_delay_window_prior_sd: float = Field(default=0.25, gt=0)
    # with the window prior, the served correction comes in as (1 / G)^(n / (n + this)), n the
    # task's positives seen: a cold model starts at its prior rates, not at p x G. 20 (the fourth
    # round's) left activation's versions of days 3-7 at 0.7-0.8 of the truth; 5 lifts them (p05
    # +0.04-0.07 in replays of kept runs, nothing else judged moves) but raises the first two days'
    # versions (up to 1.33 in one replay); 0 = in full from the first positive (docs/serving.md, sixth round)
    trainer_delay_served_ramp: float = Field(default=5.0, ge=0)
    # the served level from a delay-corrected count (stream/learn/served_level.py, docs/serving.md,
    # seventh round): for these tasks the served biases are shifted so that the served mean on the
    # newest TRAINER_SERVED_LEVEL_ROWS impressions is P / (n x mean G), P the positives arrived for
    # them and G of their age averaged over those that can still convert, shrunk towards the model's
    # own served mean (the live mean x 1 / mean G) by the pseudo-count, in positives - instead of
    # that own mean, which assumes the live model has learned every positive that arrived. Replays:
    # it lifts batch-fed activation's p05 but swings its first days past 1.3 and lowers realtime's;
    # [] = off
    trainer_served_level_tasks: list[Literal["click", "application", "approval", "activation"]] = Field(
        default_factory=list)
    trainer_served_level_pseudo_count: float = Field(default=100.0, ge=0)
    trainer_served_level_rows: int = Field(default=32768, ge=1)
    # a step served at its predecessor's served level times the step rate counted on the
    # predecessor's positives (stream/learn/served_ratio.py, docs/serving.md, eighth round):
    # R = A / sum G_c(age), A the predecessors whose step positive arrived, G_c the step's own delay
    # (from the predecessor's event, window JOINER_WINDOW_<STEP>_MS as its prior), shrunk towards
    # TRAINER_SERVED_RATIO_TARGET by the pseudo-count, in predecessors; over at most ..._ROWS of them: the
    # newest, or once they no longer reach back a step's window, a hash sample of the window's.
    # [] = off (the served level is the live model's own x the completeness factor)
    trainer_served_ratio_tasks: list[Literal["application", "approval", "activation"]] = Field(
        default=["application", "approval", "activation"])  # pydantic copies a mutable default per instance
    trainer_served_ratio_pseudo_count: float = Field(default=30.0, ge=0)
    trainer_served_ratio_rows: int = Field(default=65536, ge=1)
    # "set": the counted level sets the served level (the default since the ninth round, when the
    # count stopped reading low); "raise": it only raises it above the live model's own (x the
    # completeness factor)
    trainer_served_ratio_mode: Literal["raise", "set"] = "set"
    # predecessors whose fitted G is under this are left out of the count (the fit's head is
    # where a lognormal is least right: served_ratio.py)
    trainer_served_ratio_min_g: float = Field(default=0.65, ge=0, lt=1)
    # what the count is shrunk towards: "prior" - the higher of the live model's own ratio and the
    # step rate of TRAINER_PRIOR_RATES (the model's own reads low in a cold start: it learns late
    # positives late); "own" - the live model's own ratio alone
    trainer_served_ratio_target: Literal["prior", "own"] = "prior"

    @field_validator("trainer_delay_correction", mode="before")
    @classmethod
    def _delay_correction_bool(cls, v: Any) -> Any:
        """The old boolean spelling: true meant the training weights, false off."""
        if isinstance(v, bool) or str(v).lower() in ("true", "false", "1", "0"):
            return "train" if str(v).lower() in ("true", "1") else "off"
        return v
    # share of impressions (by a hash of the id) never trained on: they judge the served versions
    # (the publication gate and the served-version gauges). Lower it at high volume: at most
    # 50,000 held-back impressions are kept, and activation needs ~15 days of them
    trainer_holdout_share: float = Field(default=0.05, ge=0, lt=1)
    # each task is judged on this many newest held-back impressions whose label is settled
    trainer_holdout_window: int = Field(default=5000, ge=10)
    # the gate judges a task once it has this many settled held-back impressions; it refuses a
    # candidate whose log loss on a task is worse by more than this share (and 3 standard errors),
    # or whose calibration error is more than this factor worse (and beyond 3 standard errors)
    trainer_gate_min_rows: int = Field(default=500, ge=1)
    trainer_gate_log_loss_margin: float = Field(default=0.1, ge=0)
    trainer_gate_calibration_margin: float = Field(default=1.5, ge=1)
    # model store: a directory of versions; keep this many newest
    model_store_dir: Path | None = None  # default: DATA_DIR/models
    model_store_keep: int = Field(default=20, ge=2)
    # training checkpoints (model, optimizer, offsets: only a restart reads them) kept beside the
    # serving artifacts; the newest that loads is resumed from, the one before covers a damaged file
    model_store_keep_checkpoints: int = Field(default=3, ge=2)
    # a version's serving artifact is a full snapshot every this many versions (and after every
    # trainer start), a delta of the rows changed since the previous version otherwise; 1 = always full
    model_store_full_every: int = Field(default=20, ge=1)

    # --- scorer (stream/serve/scorer.py): scores topic and HTTP endpoint
    scorer_group_id: str = "aitm-scorer"
    scorer_batch_size: int = Field(default=500, ge=1)
    scorer_threads: int = Field(default=1, ge=1)  # torch threads: batch-1 latency is best on one
    # the bank's objective (Eq. 1 selector) and ranking weight; banks not listed use the defaults
    scorer_default_objective: Literal["approval", "activation"] = "approval"
    scorer_bank_objectives: dict[str, Literal["approval", "activation"]] = Field(default_factory=dict)
    scorer_default_weight: float = Field(default=1.0, ge=0)
    scorer_bank_weights: dict[str, float] = Field(default_factory=dict)
    # HTTP endpoint (stream/serve/http.py): one access-log line per request (logger
    # aitm.scorer.access); POST /score/batch at most this many impressions and bytes per call
    scorer_http_access_log: bool = True
    scorer_http_max_batch: int = Field(default=1000, ge=1)
    scorer_http_max_batch_bytes: int = Field(default=4 << 20, ge=1024)
    # serve each version through a TorchScript trace (batch-1 forward 0.40 -> 0.14 ms, same bits)
    # at ~0.3 s of CPU per version loaded (a version every 3 s by default): for HTTP-heavy scorers
    scorer_torchscript: bool = False
    # the HTTP endpoint's forward (stream/serve/fastpath.py): "onnx" = each version exported to
    # onnxruntime in the background after 1,000 HTTP impressions (~0.35 s CPU; batch-1 forward 0.40 ->
    # 0.05 ms; checked within 1e-5 of the torch model, else served eager); "torch" = always eager
    scorer_http_engine: Literal["onnx", "torch"] = "onnx"

    def joiner_lateness_ms(self) -> tuple[int, int, int, int, int]:
        """Allowed lateness of the impressions, clicks, applications, approvals, activations topics."""
        return (
            self.joiner_allowed_lateness_ms,
            self.joiner_allowed_lateness_ms_click,
            self.joiner_allowed_lateness_ms_application,
            self.joiner_allowed_lateness_ms_approval,
            self.joiner_allowed_lateness_ms_activation,
        )

    def model_store_path(self) -> Path:
        """The model store directory (``MODEL_STORE_DIR``, else ``DATA_DIR/models``)."""
        return self.model_store_dir if self.model_store_dir is not None else Path(self.data_dir) / "models"

    def bootstrap(self) -> str:
        """The bootstrap servers; unset means the embedded broker's loopback address."""
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.embedded_broker_port}"

    def recovery_consistency_check(self) -> bool:
        """Faust's changelog consistency check: on for a real Kafka, off for the embedded broker."""
        if self.joiner_recovery_consistency_check is not None:
            return self.joiner_recovery_consistency_check
        return self.kafka_bootstrap_servers is not None

    def event_topics(self) -> dict[str, str]:
        """Funnel step name -> topic name, in funnel order."""
        return {
            "impression": self.topic_impressions,
            "click": self.topic_clicks,
            "application": self.topic_applications,
            "approval": self.topic_approvals,
            "activation": self.topic_activations,
        }

    def topic_specs(self) -> list[TopicSpec]:
        """Every topic the project uses, with its partition count."""
        events = [TopicSpec(name=t, partitions=self.event_partitions) for t in self.event_topics().values()]
        return [
            *events,
            TopicSpec(name=self.topic_samples, partitions=self.samples_partitions),
            TopicSpec(name=self.topic_dead_letters, partitions=1),
            TopicSpec(name=self.topic_scores, partitions=self.scores_partitions),
            # compacted: the newest announcement (key "model") is kept however long the topic lives
            TopicSpec(name=self.topic_model_versions, partitions=1, config={"cleanup.policy": "compact"}),
        ]

    def kafka_python_config(self) -> dict[str, Any]:
        """Connection settings for kafka-python clients (security passed through)."""
        return kafka_client_config(self, style="kafka-python")

    def aiokafka_config(self) -> dict[str, Any]:
        """Connection settings for aiokafka / faust clients."""
        return kafka_client_config(self, style="aiokafka")


def kafka_client_config(settings: Settings, style: Literal["kafka-python", "aiokafka"]) -> dict[str, Any]:
    """Build client keyword arguments: bootstrap plus SASL/TLS, secrets revealed only here."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap(),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        if settings.kafka_sasl_mechanism is None or settings.kafka_sasl_username is None:
            raise SettingsError(
                "KAFKA_SECURITY_PROTOCOL is SASL_*: set KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME "
                "and KAFKA_SASL_PASSWORD"
            )
        password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
        cfg["sasl_mechanism"] = settings.kafka_sasl_mechanism
        cfg["sasl_plain_username"] = settings.kafka_sasl_username
        cfg["sasl_plain_password"] = password
    if settings.kafka_security_protocol.endswith("SSL"):
        files = {
            "cafile": settings.kafka_ssl_cafile,
            "certfile": settings.kafka_ssl_certfile,
            "keyfile": settings.kafka_ssl_keyfile,
        }
        if style == "kafka-python":
            for key, path in files.items():
                if path is not None:
                    cfg[f"ssl_{key}"] = str(path)
            if settings.kafka_ssl_password is not None:
                cfg["ssl_password"] = settings.kafka_ssl_password.get_secret_value()
        else:
            import ssl

            ctx = ssl.create_default_context(cafile=str(files["cafile"]) if files["cafile"] else None)
            if files["certfile"] is not None:
                ctx.load_cert_chain(
                    str(files["certfile"]),
                    str(files["keyfile"]) if files["keyfile"] else None,
                    settings.kafka_ssl_password.get_secret_value() if settings.kafka_ssl_password else None,
                )
            cfg["ssl_context"] = ctx
    return cfg


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (the only place that does so)."""
    return Settings(**overrides)
