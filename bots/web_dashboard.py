"""The operator's dashboard at /dashboard: users, activity, rewards, what was learned, adapters.

Off unless ``ATTUNE_ADMIN_TOKEN`` is set (the page then says how to turn it on). A
browser signs in with the token once (a form; the cookie holds an HMAC of the token,
never the token); scripts send ``Authorization: Bearer <token>``. The page is rendered
on the server, plots included (SVG), with every piece of user text escaped; it needs no
JavaScript. ``GET /dashboard/api/overview`` returns the same data as JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from html import escape
from typing import Any, NoReturn, Protocol

from aiohttp import web

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.operations import Outcome
from agent_core.policy import REALISATION_WINDOW
from agent_core.stores import UNAVAILABLE
from agent_core.style import DIMENSIONS

log = logging.getLogger(__name__)

ADMIN_COOKIE = "attune_admin"
PALETTE = ["#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]
NOTICES = {
    "train-started": "Training started for that user; reload this page to follow its run below.",
    "train-busy": "A training run is already going on; try again when it has finished.",
    "train-too-little": "That user has too little rated feedback to train on yet (a few liked replies at least).",
    "rolled-back": "Rolled back; the user's row says what serves them now.",
    "no-adapter": "That user has no adapter of their own in service; nothing to roll back.",
    "cancelled": "The running training was asked to stop; the adapters in service stay as they are.",
    "not-running": "No training is running.",
}


class Site(Protocol):
    """What the dashboard needs of the web chat server it is mounted on (``bots.web``)."""

    @property
    def secure_cookies(self) -> bool: ...

    def csrf_token(self, request: web.Request) -> str: ...

    def with_cookies(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse: ...


class Dashboard:
    def __init__(self, agent: Agent, config: Config, site: Site) -> None:
        self.agent = agent
        self.operations = agent.operations
        self.token = config.secrets.get("admin_token")
        self.web = site
        self._said: dict[str, str] = {}  # notice code -> the last outcome's own words (which model serves now)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self.page)
        app.router.add_get("/dashboard/api/overview", self.overview_json)
        app.router.add_post("/dashboard/login", self.login)
        app.router.add_post("/dashboard/logout", self.logout)
        app.router.add_post("/dashboard/users/{user_id:\\d+}/{action:train|rollback}", self.action)
        app.router.add_post("/dashboard/training/cancel", self.cancel)
        app.on_cleanup.append(self._stop_training)

    # --- who may look ---------------------------------------------------------------------

    def _session_value(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"attune dashboard session", hashlib.sha256).hexdigest()

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return False
        bearer = request.headers.get("Authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), self.token.encode()):
            return True
        return hmac.compare_digest(request.cookies.get(ADMIN_COOKIE, ""), self._session_value())

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self.token is None:
            body = _layout("Dashboard off", "<p>The dashboard is off. Set <code>ATTUNE_ADMIN_TOKEN</code> in the "
                           "environment and restart attune to turn it on.</p>")  # fmt: skip
            return web.Response(text=body, status=503, content_type="text/html")
        if self._authorized(request):
            return None
        if request.method == "GET" and not request.path.startswith("/dashboard/api/"):
            csrf = escape(self.web.csrf_token(request))
            form = (
                '<form method="post" action="/dashboard/login" class="login">'
                f'<input type="hidden" name="csrf" value="{csrf}">'
                '<label>Admin token <input type="password" name="token" autocomplete="current-password"></label>'
                '<button type="submit">Sign in</button></form>'
            )
            page = web.Response(text=_layout("Sign in", form), status=401, content_type="text/html")
            self.web.with_cookies(request, page)
            return page
        return web.json_response({"error": "admin token missing or wrong"}, status=401)

    async def login(self, request: web.Request) -> web.StreamResponse:
        if self.token is None:
            return self._refusal(request)  # type: ignore[return-value]
        given = str((await request.post()).get("token", ""))
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return web.Response(text=_layout("Refused", "<p>Wrong token.</p>"), status=403, content_type="text/html")
        response = web.HTTPSeeOther("/dashboard")
        response.set_cookie(ADMIN_COOKIE, self._session_value(), httponly=True, samesite="Strict",
                            secure=self.web.secure_cookies, path="/dashboard")  # fmt: skip
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/dashboard")
        response.del_cookie(ADMIN_COOKIE, path="/dashboard")
        raise response

    async def action(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        user_id = int(request.match_info["user_id"])
        if request.match_info["action"] == "rollback":
            self._notice(await self.operations.rollback(user_id))
        self._notice(await self.operations.train_now(user_id, by="dashboard"), "Reload to follow its run below.")

    def _notice(self, outcome: Outcome, then: str = "") -> NoReturn:
        """Back to the page, which shows what the action did in the operations' own words."""
        self._said[outcome.code] = f"{outcome.message} {then}" if then and outcome.ok else outcome.message
        raise web.HTTPSeeOther(f"/dashboard?notice={outcome.code}")

    async def _stop_training(self, app: web.Application) -> None:
        """The server is stopping: a training started here stops too (adapters in service stay)."""
        await self.operations.close()

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        self._notice(await self.operations.stop())

    # --- what it shows -------------------------------------------------------------------

    async def overview(self) -> dict[str, Any]:
        return await self.operations.overview()

    async def overview_json(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        return web.json_response(await self.overview())

    async def page(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        health = await self.agent.health()
        try:
            data = await self.overview()
        except UNAVAILABLE as exc:  # the page still says what is down
            log.warning("dashboard: the database cannot be read now (%s)", exc)
            body = _health(health) + "<p>The database cannot be read now; the page shows it again once it is back.</p>"
            return self.web.with_cookies(request, web.Response(text=_layout("attune dashboard", body),
                                                               content_type="text/html", status=503))  # fmt: skip
        users: list[dict[str, Any]] = data["users"]
        names = {str(u["id"]): u["name"] for u in users}
        csrf = escape(self.web.csrf_token(request))
        code = request.query.get("notice", "")
        notice = self._said.get(code) or NOTICES.get(code, "")
        daily = data["daily"]
        shown = [[dim, value, n, k, f"{k / n:.0%}" if n else "–"]
                 for dim, values in data["asked_and_shown"].items() for value, (n, k) in values.items()]  # fmt: skip
        parts = [
            f'<form method="post" action="/dashboard/logout" class="logout"><input type="hidden" name="csrf" '
            f'value="{csrf}"><button>Sign out</button></form>',
            _health(health),
            f"<p class='model'>Model: {escape(data['model'])}</p>",
            f'<p class="notice" role="status">{escape(notice)}</p>' if notice else "",
            "<section><h2>Activity</h2>"
            f"<p>{len(users)} users, {sum(d['messages'] for d in daily)} messages, "
            f"{sum(d['reactions'] for d in daily)} reactions.</p>",
            bar_plot(daily),
            "</section><section><h2>Reward over time</h2>"
            "<p>Mean reward of the reactions each person gave to replies meant for them, per day.</p>",
            reward_plot(data["reward_by_day"], names),
            "</section><section><h2>Style: asked for and shown</h2>"
            f"<p>Of the last {REALISATION_WINDOW} replies, how often the style the policy asked for is in the text "
            "(read by <code>measure_style</code>). The policy learns from what was shown.</p>",
            _table(["dimension", "value", "asked", "shown", "share"], shown, "No replies yet."),
            "</section><section><h2>Users</h2>",
            _users_table(
                users,
                {int(k): v for k, v in data["beliefs"].items()},
                {int(k): v for k, v in data["learned"].items()},
                csrf,
            ),
            "</section><section><h2>Adapters</h2>",
            _table(
                ["user", "version", "status", "on top of", "held-out NLL liked: served → new", "pref. accuracy"],
                [
                    [a["name"] or "population", a["version"], a["status"], a["parent"], *_gains(a["metrics"])]
                    for a in data["adapters"]
                ],
                "No adapters trained yet.",
            ),
            "</section><section><h2>Training runs</h2>",
            f'<form method="post" action="/dashboard/training/cancel"><input type="hidden" name="csrf" '
            f'value="{csrf}"><button>Stop the running training</button></form>',
            _runs(data["training_runs"]),
            "</section>",
        ]
        page = web.Response(text=_layout("attune dashboard", "".join(parts)), content_type="text/html")
        self.web.with_cookies(request, page)
        return page


# --- rendering (every value from users goes through escape) ----------------------------------


def _health(health: dict[str, Any]) -> str:
    """The line at the top: whether the database and the model can be used (as ``/healthz``)."""
    parts = [f"{name}: {'ok' if health[name]['ok'] else 'DOWN'} ({escape(str(health[name]['detail']))})"
             for name in ("database", "model")]  # fmt: skip
    state = "ok" if health["ok"] else "down"
    return f'<p class="health {state}" role="status" id="health">{" · ".join(parts)}</p>'


def _layout(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
        '<link rel="stylesheet" href="/static/dashboard.css"></head>'
        f"<body><header><h1>{escape(title)}</h1></header><main>{body}</main></body></html>"
    )


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f"<p class='empty'>{escape(empty)}</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _beliefs(user: dict[str, Any], beliefs: dict[str, Any]) -> str:
    """Per style dimension: the explicit setting, else what the policy believes (and how
    sure), with the mean reward seen for each value."""
    items = []
    prefers = beliefs.get("prefers", {})
    for dim in DIMENSIONS:
        if dim in user["preferences"]:
            items.append(f"<li><b>{dim}</b>: {escape(user['preferences'][dim])} (set by /prefs)</li>")
            continue
        belief = prefers.get(dim)
        text = f"{escape(belief['value'])} ({belief['probability']:.0%})" if belief else "no belief"
        seen = user["style_rewards"].get(dim, {})
        if seen:
            ranked = sorted(seen.items(), key=lambda kv: -kv[1][0])
            text += "; seen: " + ", ".join(f"{escape(v)} {mean:+.2f} (n={n})" for v, (mean, n) in ranked)
        items.append(f"<li><b>{dim}</b>: {text}</li>")
    return f"<ul class='beliefs'>{''.join(items)}</ul>"


def _learned(learned: dict[str, str | None]) -> str:
    """What the user's reward model learned from their reactions, and how their replies changed."""
    lines = [learned.get("terms") or "nothing stands out yet", learned.get("changes") or ""]
    return "<br>".join(escape(line) for line in lines if line)


def _users_table(users: list[dict[str, Any]], beliefs: dict[int, dict[str, Any]],
                 learned: dict[int, dict[str, str | None]], csrf: str) -> str:  # fmt: skip
    if not users:
        return "<p class='empty'>Nobody has written yet.</p>"
    rows = []
    for u in users:
        reward = "" if u["mean_reward"] is None else f"{u['mean_reward']:+.2f}"
        buttons = "".join(
            f'<form method="post" action="/dashboard/users/{u["id"]}/{action}"><input type="hidden" name="csrf" '
            f'value="{csrf}"><button>{label}</button></form>'
            for action, label in (("train", "Train now"), ("rollback", "Roll back"))
        )
        rows.append(
            f"<tr><td>{escape(u['name'])}</td><td>{escape(', '.join(u['platforms']))}</td><td>{u['messages']}</td>"
            f"<td>{u['reactions']}</td><td>{reward}</td><td>{_beliefs(u, beliefs.get(u['id'], {}))}</td>"
            f"<td class='learned'>{_learned(learned.get(u['id'], {}))}</td>"
            f"<td class='actions'>{buttons}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("user", "platforms", "messages", "reactions", "mean reward",
                                             "what it believes about their style",
                                             "what their reward model learned", ""))  # fmt: skip
    return f"<table class='users'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "<p class='empty'>No training runs yet.</p>"
    rows = []
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run["started_at"]))
        log = f"<details><summary>log</summary><pre>{escape(run['log'] or '')}</pre></details>"
        took = f"{run['finished_at'] - run['started_at']:.0f} s" if run["finished_at"] else "running"
        nll, acc = _gains(run["metrics"])
        cells = [run["name"] or "population", run["status"], run["decision"] or "", run["rated"], started, took, nll,
                 acc]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + f"<td>{log}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("user", "status", "decision", "rated replies", "started (UTC)",
                                             "took", "NLL liked: served → new", "pref. accuracy", ""))  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _gains(metrics_json: str | None) -> list[str]:
    """Held-out figures of a run or adapter: NLL of liked replies and preference accuracy, served → new."""
    m = json.loads(metrics_json) if metrics_json else {}
    if "candidate" not in m:
        return ["", ""]

    def pair(key: str, spec: str) -> str:
        values = [m.get(k, {}).get(key) for k in ("in_service", "candidate")]
        return " → ".join("–" if v is None else format(v, spec) for v in values)

    return [pair("nll_liked", ".3f"), pair("preference_accuracy", ".2f")]


def reward_plot(series: dict[str, list[tuple[str, float, int]]], names: dict[str, str],
                width: int = 720, height: int = 260) -> str:  # fmt: skip
    """An SVG line plot of mean reward (-1 to 1) per day: everyone, and each user."""
    days = sorted({day for points in series.values() for day, _, _ in points})
    if not days:
        return "<p class='empty' id='reward-plot-empty'>No rewards yet: react to a reply to see one here.</p>"
    left, right, top, bottom = 44, 150, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(day: str) -> float:
        return left + (days.index(day) + 0.5) * plot_w / len(days)

    def y(value: float) -> float:
        return top + (1 - (value + 1) / 2) * plot_h

    out = [f'<svg id="reward-plot" class="plot" viewBox="0 0 {width} {height}" role="img" '
           'aria-label="mean reward per day" xmlns="http://www.w3.org/2000/svg">']  # fmt: skip
    for value in (-1, 0, 1):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:+d}</text>')  # fmt: skip
    for day in days[:: max(1, len(days) // 8)]:
        out.append(f'<text x="{x(day):.1f}" y="{height - 8}" text-anchor="middle">{escape(day[5:])}</text>')
    ordered = ["all", *sorted(k for k in series if k != "all")]
    for i, key in enumerate(ordered[: len(PALETTE)]):
        color, points = PALETTE[i], series[key]
        label = "everyone" if key == "all" else names.get(key, f"user {key}")
        coords = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v, _ in points)
        width_attr = 3 if key == "all" else 1.5
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="{width_attr}" '
                   f'class="series" data-series="{escape(key)}"/>')  # fmt: skip
        for d, v, n in points:
            out.append(f'<circle cx="{x(d):.1f}" cy="{y(v):.1f}" r="3" fill="{color}">'
                       f"<title>{escape(label)} {escape(d)}: {v:+.2f} ({n} reactions)</title></circle>")  # fmt: skip
        out.append(f'<text x="{left + plot_w + 10}" y="{top + 14 + 16 * i}" fill="{color}">{escape(label[:18])}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_plot(daily: list[dict[str, Any]], width: int = 720, height: int = 180) -> str:
    """An SVG bar chart: messages and reactions per day."""
    if not daily:
        return "<p class='empty'>No messages yet.</p>"
    left, top, bottom = 44, 12, 28
    plot_w, plot_h = width - left - 10, height - top - bottom
    peak = max(max(d["messages"], d["reactions"]) for d in daily) or 1
    slot = plot_w / len(daily)
    out = [f'<svg id="activity-plot" class="plot" viewBox="0 0 {width} {height}" role="img" '
           'aria-label="messages and reactions per day" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak}</text>']  # fmt: skip
    for i, d in enumerate(daily):
        for j, (key, cls) in enumerate((("messages", "bar-messages"), ("reactions", "bar-reactions"))):
            h = d[key] / peak * plot_h
            out.append(f'<rect x="{left + i * slot + j * slot / 2 + 2:.1f}" y="{top + plot_h - h:.1f}" '
                       f'width="{max(slot / 2 - 4, 1):.1f}" height="{h:.1f}" class="{cls}">'
                       f"<title>{escape(d['day'])}: {d[key]} {key}</title></rect>")  # fmt: skip
        out.append(f'<text x="{left + (i + 0.5) * slot:.1f}" y="{height - 8}" text-anchor="middle">'
                   f"{escape(d['day'][5:])}</text>")  # fmt: skip
    out.append("</svg>")
    return "".join(out)
