"""A training step's live card. The stage runs in its own subprocess and writes `progress.jsonl`
(`rlhf_lib/progress.py`); while the step's task waits for it, a thread here reads what is new and redraws the
step's realtime Metaflow card — step N of M with an ETA, the stage's curves, the newest sample generations of an
online method, the checkpoint it would resume from — at a bounded rate: every `run.card_refresh_s` seconds at first,
then every sixth of the time the stage has trained (a 10-hour stage redraws ~50 times). The layout (once) and each
redraw are written from the step's own process (`write_layout`, `write_data_update`), not by Metaflow's `card
create` subprocess. Watch it in the Metaflow UI or `python flows/rlhf_flow.py card server` (docs/inspecting.md).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from rlhf_lib import methods
from rlhf_lib.progress import PROGRESS_FILE, duration, number, read

# The stages whose step shows a live card while they train (SFT, both reward models, every method).
STAGES = {"sft", "reward", "reward_gold", *methods.names()}
POLL_S = 1.0
CURVE_POINTS = 400  # per metric, the newest: a long stage's chart stays small
CURVE_METRICS = ("loss", "eval_loss", "reward", "score_mean", "kl", "objective/kl", "rewards/accuracies",
                 "eval_accuracy", "accuracy", "mean_reward_all", "kept_fraction", "grad_norm")


def steps(run_methods: list[str]) -> set[str]:
    """The flow steps that carry a realtime card in a run of `run_methods` (rlhf_lib/decorators.py): SFT's, the
    reward's and the training steps of the methods the run trains. A method the run skips finishes at once with
    nothing to watch, and a card costs its step two `card create` subprocesses when it ends (Metaflow's final render
    and refresh) — five skipped methods' ten ran beside PPO in the default run."""
    return {"sft", "reward", *(s for m in run_methods for s in methods.REGISTRY[m].train_steps)}


def card_of_step():
    """This step's default card when the step carries one (the flow's mutator puts a realtime card on every
    training step: rlhf_lib/decorators.py), else None."""
    from metaflow import current

    return getattr(current, "card", None) if getattr(current, "is_running_flow", False) else None


class LiveCard:
    """The components of one stage's live card, and what the stage has reported so far."""

    def __init__(self, card, stage: str):
        from metaflow.cards import Markdown, ProgressBar, VegaChart

        self.card, self.stage = card, stage
        self.total, self.done, self.eta, self.unit = None, 0, None, "step"
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.samples: list[dict] = []
        self.checkpoint: str | None = None
        self.header = Markdown(f"## {stage}: starting")
        self.bar = ProgressBar(max=1, label=f"{stage} steps", value=0)
        self.chart = VegaChart(self.spec())
        self.sample_text = Markdown("")
        self.resume_text = Markdown("")
        for component in (self.header, self.bar, self.chart, self.sample_text, self.resume_text):
            card.append(component)

    def feed(self, entries: list[dict]) -> None:
        for e in entries:
            if e.get("event") == "start":
                self.total, self.unit, self.done = e["total"], e.get("unit", "step"), e.get("start", 0)
            elif e.get("event") == "update":
                self.done, self.eta = e["done"], e.get("eta_s")
                self.add_points(e["done"], e)
            elif e.get("event") == "note":
                self.samples = e.get("samples") or self.samples
                self.checkpoint = e.get("checkpoint") or self.checkpoint
                if isinstance(e.get("metrics"), dict):
                    self.add_points(e.get("step", self.done), e["metrics"])

    def add_points(self, step: int, values: dict) -> None:
        for key in CURVE_METRICS:
            if isinstance(values.get(key), (int, float)):
                points = self.curves.setdefault(key, [])
                points.append((step, float(values[key])))
                del points[:-CURVE_POINTS]

    def spec(self) -> dict:
        rows = [{"step": s, "metric": k, "value": v} for k, pts in self.curves.items() for s, v in pts]
        return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 520, "height": 220,
                "title": f"{self.stage}: curves as logged", "data": {"values": rows}, "mark": "line",
                "encoding": {"x": {"field": "step", "type": "quantitative"},
                             "y": {"field": "value", "type": "quantitative"},
                             "color": {"field": "metric", "type": "nominal"}},
                "resolve": {"scale": {"y": "independent"}}}

    def headline(self) -> str:
        if self.total is None:
            return f"## {self.stage}: starting"
        eta = "—" if self.eta is None else duration(self.eta)
        latest = {k: pts[-1][1] for k, pts in self.curves.items() if pts}
        shown = ", ".join(f"{k} {number(v)}" for k, v in list(latest.items())[:4])
        return (f"## {self.stage}: {self.unit} {self.done} of {self.total} ({100 * self.done // self.total}%), "
                f"ETA {eta}\n\n{shown}\n\n_updated {time.strftime('%H:%M:%S')}_")

    def draw(self) -> None:
        self.header.update(self.headline())
        if self.total:
            self.bar._max = self.total  # the total is known once the stage has started
        self.bar.update(self.done)
        self.chart.update(self.spec())
        self.sample_text.update("### Newest samples\n\n" + "\n\n".join(
            f"**prompt** {s['prompt'][-300:]!s}\n\n**response** {s['response'][:500]!s} (score {s.get('score')})"
            for s in self.samples) if self.samples else "")
        self.resume_text.update(f"Would resume from: `{self.checkpoint}`" if self.checkpoint else
                                "No checkpoint yet: a restart begins at step 0.")


def _card_store(card):
    """(the card's uuid, the card datastore of this task) — where `card create` saves a card and its data. Built on
    Metaflow 2.19's card internals (requirements.txt pins it); the flow fixture's test reads the layout and the
    updates from the datastore mid-step through the Client API, so a change there fails the suite."""
    from types import SimpleNamespace

    from metaflow import current
    from metaflow.plugins import DATASTORES
    from metaflow.plugins.cards.card_datastore import CardDatastore

    options = card._card_creator._top_level_options
    kind = options[options.index("--datastore") + 1]
    storage = next(d for d in DATASTORES if d.TYPE == kind)(CardDatastore.get_storage_root(kind))
    store = CardDatastore(SimpleNamespace(_storage_impl=storage, flow_name=current.flow_name),
                          pathspec=current.pathspec)
    return card._default_editable_card, store


def write_layout(card) -> None:
    """What `card.refresh(force=True)` has Metaflow do in a `card create --mode render_runtime` subprocess — render
    the card's runtime page (its components' layout) and save it to the card datastore — done from this process.
    That subprocess loads the whole flow (about a second of CPU on 2 cores, as the stage loads its model). The page
    is BlankCard's own runtime render with the reload token Metaflow gives it (`runtime-<layout timestamp>`), so
    the data updates that follow apply to it. Should this fail, Metaflow's own refresh does it."""
    from types import SimpleNamespace

    from metaflow import current
    from metaflow.plugins.cards.card_modules.basic import BlankCard

    try:
        uuid, store = _card_store(card)
        data = card._get_latest_data(uuid, final=False, mode="render_runtime")
        html = BlankCard(components=card._serialize_components(uuid)).render(SimpleNamespace(pathspec=current.pathspec),
                                                                             runtime=True)
        store.save_card(uuid, "blank", html.replace(BlankCard.RELOAD_POLICY_TOKEN,
                                                    f"runtime-{data['component_update_ts']}"))
    except Exception as err:  # noqa: BLE001 — a card is never worth a failed stage
        print(f"[live] rendering the card's layout here failed ({type(err).__name__}: {err}); "
              f"Metaflow's card subprocess does it", flush=True)
        card.refresh(force=True)


def write_data_update(card) -> None:
    """What `card.refresh()` has Metaflow do in a `card create --mode refresh` subprocess — save the card's data
    update (its components' new state) to the card datastore — done from this process instead: that subprocess
    loads the whole flow for a JSON write, and on a 2-core machine each one stalled the stage's torch threads (PPO
    took ~9 s longer with five of them). The payload is BlankCard's `refresh` with its reload token (layout
    unchanged), saved where `card create` saves it. Should this fail, Metaflow's own refresh does it."""
    try:
        uuid, store = _card_store(card)
        data = card._get_latest_data(uuid, final=False, mode="refresh")
        store.save_data(uuid, "blank", {"reload_token": f"runtime-{data['component_update_ts']}",
                                        "data": data["components"], "created_on": time.time()})
    except Exception as err:  # noqa: BLE001 — a card is never worth a failed stage
        print(f"[live] writing the card's data update here failed ({type(err).__name__}: {err}); "
              f"Metaflow's card subprocess does it", flush=True)
        card.refresh()


def due(now: float, began: float, last: float, every_s: float) -> bool:
    """Redraw every `every_s` seconds at first, then every sixth of the time elapsed since `began`."""
    return now - last >= max(every_s, (now - began) / 6)


@contextlib.contextmanager
def watching(work: Path, stage: str, every_s: float, clock=time.monotonic):
    """While the block runs (the stage's subprocess), redraw this step's live card from `work/progress.jsonl`; a
    no-op outside a step that carries a card. The last state is drawn when the block ends."""
    card = card_of_step()
    if card is None:
        yield
        return
    live, stop = LiveCard(card, stage), threading.Event()

    def follow():
        # The layout and the redraws are written here (`write_layout`, `write_data_update`): Metaflow's own `card
        # create` subprocesses cost the stage seconds each on 2 cores, and at a lower priority they starved (one
        # state in a whole PPO stage). Their rate (`due`) bounds what the rest costs.
        offset, began, last, drawn = 0, None, clock(), False
        while not stop.wait(POLL_S):
            entries, offset = read(Path(work) / PROGRESS_FILE, offset)
            live.feed(entries)
            if began is None and live.total is not None:  # training has begun: the pace counts from here, not
                began = clock()  # from the imports and the model's loading before it
            if not drawn:  # the card's layout, once, as soon as the stage has started
                write_layout(card)
                drawn = True
            elif entries and due(now := clock(), now if began is None else began, last, every_s):
                live.draw()
                write_data_update(card)
                last = clock()
        live.feed(read(Path(work) / PROGRESS_FILE, offset)[0])
        live.draw()

    thread = threading.Thread(target=follow, daemon=True, name=f"live card {stage}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def watch_card(running, run_id, step: str, every_s: float = 1.0) -> list[str]:
    """Read `step`'s card from the datastore every `every_s` seconds while `running()` is true and the step's task
    has not finished — as a notebook watching the run would (Metaflow's Client API). `run_id()` names the run once it
    has started (None before). Returns a list the watcher keeps appending to: each distinct state of the card's
    data, in order, as JSON text."""
    import json

    seen: list[str] = []

    def poll():
        from metaflow import Run, namespace
        from metaflow.cards import get_cards

        namespace(None)
        while running():
            time.sleep(every_s)
            found = run_id()
            try:
                task = Run(f"RLHFFlow/{found}")[step].task if found else None
                if task is None or task.finished:
                    continue
                for card in get_cards(task):
                    data = json.dumps(card.get_data(), sort_keys=True)
                    if data != "null" and (not seen or seen[-1] != data):
                        seen.append(data)
            except Exception:  # the step not started yet, or its card not written yet
                continue

    threading.Thread(target=poll, daemon=True, name=f"watching {step}'s card").start()
    return seen
