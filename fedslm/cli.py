"""`fedslm` console script. Sub-commands are verbs; each maps to one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _certs(args: argparse.Namespace) -> int:
    from fedslm.deploy.certs import PRODUCTION_NOTE, make_certs

    try:
        paths = make_certs(args.out_dir, args.host, args.sites, overwrite=args.force)
    except FileExistsError as err:
        print(f"fedslm certs: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate (each site's --root-certificates): {paths.ca_cert}")
    print(f"SuperLink certificate and key (--ssl-certfile, --ssl-keyfile), for {', '.join(args.host)}: "
          f"{paths.server_cert}, {paths.server_key}")
    for site, (private, public) in enumerate(paths.site_keys):
        print(f"site {site}: private key {private} (--auth-supernode-private-key), public key {public} "
              f"(flwr supernode register), worker secret {paths.site_secrets[site]} (--superexec-auth-secret-file "
              "of the SuperNode, --auth-secret-file of `fedslm site`)")
    print(f"app publisher: private key {paths.publisher_key} (fedslm sign-app --key), public key "
          f"{paths.publisher_pub} (each site: fedslm trusted-entity {paths.publisher_pub.name} >> trusted-publishers.yaml)")
    print(f"NOTE: {PRODUCTION_NOTE}")
    return 0


def _sign_app(args: argparse.Namespace) -> int:
    import hashlib

    from fedslm.deploy.signing import SIGNATURE_KEY, fab_bytes, load_private_key, sign_fab

    try:
        key = load_private_key(args.key)
        fab = fab_bytes(args.app_dir)
    except (OSError, ValueError) as err:
        print(f"fedslm sign-app: {err}", file=sys.stderr)
        return 2
    value = f'{SIGNATURE_KEY}="{sign_fab(fab, key)}"'
    Path(args.out).write_text(value + "\n")
    print(f"signed the app in {Path(args.app_dir).resolve()} (FAB sha256 {hashlib.sha256(fab).hexdigest()[:16]}); "
          f"wrote {args.out}")
    print(f'pass it to every run: flwr run {args.app_dir} SUPERLINK --run-config "$(cat {args.out})" --run-config "..."')
    print("any change to the app's files after signing changes the FAB, and the sites refuse it: sign again")
    return 0


def _trusted_entity(args: argparse.Namespace) -> int:
    from fedslm.deploy.signing import trusted_entity

    try:
        kid, line = trusted_entity(args.public_key)
    except (OSError, ValueError) as err:
        print(f"fedslm trusted-entity: {err}", file=sys.stderr)
        return 2
    print(f'{kid}: "{line}"')
    return 0


def _site(args: argparse.Namespace) -> int:
    from fedslm.site.worker import SiteWorker

    try:
        if not 0 <= args.spare_after_idle_s < float("inf"):
            raise ValueError(f"--spare-after-idle-s {args.spare_after_idle_s}: give seconds >= 0 (0 turns it off)")
        worker = SiteWorker(args.runtime_api, args.trusted_entities, args.root_certificates, args.auth_secret_file,
                            spare_after_idle_s=args.spare_after_idle_s or None)
    except ValueError as err:
        print(f"fedslm site: {err}", file=sys.stderr)
        return 2
    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    return 0


def _supernode(args: argparse.Namespace) -> int:
    from fedslm.site.supernode import run

    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    if args.poll_s <= 0:
        print("fedslm supernode: --poll-s must be positive", file=sys.stderr)
        return 2
    if not 10 <= args.heartbeat_s <= 1800:
        print(f"fedslm supernode: --heartbeat-s {args.heartbeat_s:g} is outside the 10-1800 s the SuperLink accepts",
              file=sys.stderr)
        return 2
    run(args.poll_s, rest, args.pull_timeout_s, args.heartbeat_s)
    return 0


def _fleet_proxy(args: argparse.Namespace) -> int:
    from fedslm.deploy.fleet_proxy import nginx_config

    print(nginx_config(args.listen, args.superlink, args.cert.resolve(), args.key.resolve(), args.ca.resolve()), end="")
    return 0


def _app_config(args: argparse.Namespace) -> int:
    from fedslm.config.pyproject import differences, write_table

    if args.write:
        write_table()
    problems = differences()
    for line in problems:
        print(f"pyproject [tool.flwr.app.config] differs from conf/: {line}", file=sys.stderr)
    if problems:
        print("run `fedslm app-config --write` to regenerate it", file=sys.stderr)
        return 1
    print("pyproject [tool.flwr.app.config] matches the Hydra defaults in conf/")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from fedslm.config import ModelConfig
    from fedslm.model import resolve_model_dir

    cfg = ModelConfig(source=args.source, path=args.path, cache_dir=args.cache_dir)
    print(resolve_model_dir(cfg))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    # The Hydra entry lives in the project directory (simulations/, beside conf/), not in
    # the installed library; Hydra owns argv parsing, so the overrides go through untouched.
    import subprocess
    from pathlib import Path

    if not (Path.cwd() / "simulations" / "run.py").is_file():
        print("fedslm simulate: run it from the fedslm project directory (the one holding simulations/ and "
              "conf/), or use `python -m simulations.run` there", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "simulations.run", *args.overrides])


def _user_errors(command: str, work, errors: tuple[type[BaseException], ...]) -> int:
    """Run a command's work; an error the user can fix prints one line and exits 2,
    anything else is a bug and keeps its traceback."""
    from fedslm import quiet

    quiet.silence_known_noise()
    try:
        work()
    except errors as err:
        print(f"fedslm {command}: {err}", file=sys.stderr)
        return 2
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from fedslm.site.ledger import LedgerError, describe

    def show() -> None:
        if not Path(args.state_dir).is_dir():
            raise FileNotFoundError(f"{args.state_dir} is not a directory (a site's state-dir holds its ledgers)")
        print(describe(Path(args.state_dir), args.delta))

    return _user_errors("ledger", show, (FileNotFoundError, LedgerError))


def _forget(args: argparse.Namespace) -> int:
    from fedslm.site.policy import DATA_CACHE, forget

    state = Path(args.state_dir)
    if not state.is_dir():
        print(f"fedslm forget: {state} is not a directory (a site's state-dir)", file=sys.stderr)
        return 2
    removed = forget(state)
    print(f"removed {len(removed)} cached file(s) of the site's data from {state / DATA_CACHE}; "
          "the privacy ledgers are kept")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedslm.privacy.audit import audit

    return _user_errors("audit", lambda: audit(args.run_dir, candidates=args.candidates, max_examples=args.max_examples),
                     (FileNotFoundError,))


def _export(args: argparse.Namespace) -> int:
    from fedslm.use.export import ParityError, export_run

    def work() -> None:
        info = export_run(args.run_dir, args.out, dtype=args.dtype, server_round=args.round, int8=args.int8)
        print(f"wrote {info['model_dir']} ({info['bytes'] / 1e6:.1f} MB) from {info['adapter']}: merge parity (fp32) "
              f"max |logit diff| {info['merge_max_abs_diff']:.2e}; as {info['dtype']}: {info['dtype_max_abs_diff']:.2e}")
        if "int8" in info:
            r = info["int8"]
            print(f"int8 copy in {r['int8_dir']}: {r['int8_bytes'] / 1e6:.1f} MB vs {r['fp16_bytes'] / 1e6:.1f} MB "
                  f"fp16; held-out answer loss {r['int8_loss']:.4f} vs {r['fp16_loss']:.4f} fp16 "
                  f"({r['examples']} examples)")

    return _user_errors("export", work, (FileNotFoundError, ParityError, ValueError))


def _generate(args: argparse.Namespace) -> int:
    from fedslm.use.chat import NotAModelError, stream_answer

    return _user_errors("generate", lambda: stream_answer(
        args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, system_prompt=args.system), (NotAModelError,))


def _evaluate(args: argparse.Namespace) -> int:
    from fedslm.use.evaluate import evaluate_command
    from fedslm.use.chat import NotAModelError

    # EvalError, DataError and ConfigError are ValueErrors
    return _user_errors("evaluate", lambda: evaluate_command(
        args.model_dir, data=args.data, task=args.task, split=args.split, overrides=args.overrides, limit=args.limit,
        choices=args.choices.split(",") if args.choices else None, baseline=args.baseline,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=args.out),
        (NotAModelError, ValueError, FileNotFoundError))


def _chat(args: argparse.Namespace) -> int:
    from fedslm.use.chat import NotAModelError, chat

    return _user_errors("chat", lambda: chat(args.model_dir, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_p=args.top_p,
                                          system_prompt=args.system), (NotAModelError,))


def _compare(args: argparse.Namespace) -> int:
    from fedslm.report.compare import compare_command

    return _user_errors("compare", lambda: compare_command(args.dirs, out=args.out), (FileNotFoundError, ValueError))


def _report(args: argparse.Namespace) -> int:
    from fedslm.report.html import run_report

    def write() -> None:
        if not Path(args.run_dir).is_dir():
            raise FileNotFoundError(f"{args.run_dir}: no such run directory")
        print(f"wrote {run_report(Path(args.run_dir))}")

    return _user_errors("report", write, (FileNotFoundError, ValueError))


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--system", default=None, help="system prompt")


def main(argv: list[str] | None = None) -> int:
    from fedslm import __version__

    parser = argparse.ArgumentParser(prog="fedslm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedslm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert/build a base model into the local cache and print its directory")
    p.add_argument("--source", choices=["embedded", "tiny"], default="embedded")
    p.add_argument("--path", default=None, help="a local Hugging Face model directory instead")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_prepare)

    s = sub.add_parser("simulate", help="run a simulated federation (Hydra overrides follow)")
    s.add_argument("overrides", nargs=argparse.REMAINDER)
    s.set_defaults(func=_simulate)

    a = sub.add_parser("audit", help="canary exposure, membership inference and an epsilon lower bound for a run")
    a.add_argument("run_dir")
    a.add_argument("--candidates", type=int, default=100, help="random secrets each canary is ranked against")
    a.add_argument("--max-examples", type=int, default=200, help="members and non-members for membership inference")
    a.set_defaults(func=_audit)

    led = sub.add_parser("ledger", help="what a site's lifetime ledgers hold: every run on each data set and its epsilon")
    led.add_argument("state_dir")
    led.add_argument("--delta", type=float, default=1e-5)
    led.set_defaults(func=_ledger)

    fg = sub.add_parser("forget", help="remove every cached copy of a site's data from its state dir (ledgers stay)")
    fg.add_argument("state_dir")
    fg.set_defaults(func=_forget)

    e = sub.add_parser("export", help="merge a run's global adapter into its base model (a standalone HF directory)")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True, help="directory to write the model to")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    e.add_argument("--round", type=int, default=None, help="export this round's adapter (default: the last)")
    e.add_argument("--int8", action="store_true", help="also write a weight-only int8 copy (out/int8) and compare "
                   "its size and held-out loss with fp16")
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="answer one prompt with a model directory, streaming the tokens")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    _sampling_options(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="a multi-turn conversation with a model directory in the terminal")
    c.add_argument("model_dir")
    _sampling_options(c)
    c.set_defaults(func=_chat)

    v = sub.add_parser("evaluate", help="perplexity, choice accuracy or generation match of a model on held-out data")
    v.add_argument("model_dir")
    v.add_argument("--data", default=None,
                   help="a data preset of conf/data (banking77, pubmedqa, medquad, clinic), a data file, or a run "
                        "directory; default: the data the model was trained on (its training_config.json)")
    v.add_argument("--task", default="perplexity", help="perplexity | choice | generate")
    v.add_argument("--split", default="eval", choices=["eval", "all"],
                   help="eval: the held-out rows of every site, as the federation split them; all: every row")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, as for simulate (e.g. data.shape=classification); repeatable")
    v.add_argument("--limit", type=int, default=0, help="score at most this many examples (0 = all)")
    v.add_argument("--choices", default=None, help="comma-separated options for --task choice (default: the labels)")
    v.add_argument("--baseline", default=None, help="a model directory to score the same way, or 'base' for the "
                   "base model of the training config; printed side by side")
    v.add_argument("--max-new-tokens", type=int, default=32, help="generate task")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--out", default=None, help="where to write eval.json (default: MODEL_DIR/eval.json)")
    v.set_defaults(func=_evaluate)

    k = sub.add_parser("certs", help="development CA, SuperLink certificate and per-site node keys for a deployment")
    k.add_argument("out_dir")
    k.add_argument("--host", action="append", default=None,
                   help="the SuperLink's address as the sites dial it (IP or DNS name; repeat for more)")
    k.add_argument("--sites", type=int, default=2, help="node-authentication key pairs to create")
    k.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    k.set_defaults(func=_certs)

    sa = sub.add_parser("sign-app", help="publisher: sign the app (the FAB `flwr run` ships) with an Ed25519 key")
    sa.add_argument("app_dir", nargs="?", default=".")
    sa.add_argument("--key", type=Path, required=True, help="the publisher's private key (ssh-keygen -t ed25519)")
    sa.add_argument("--out", default="app-signature.txt", help="where to write the run-config value")
    sa.set_defaults(func=_sign_app)

    te = sub.add_parser("trusted-entity", help="site: the trusted-entities YAML line for a publisher's public key")
    te.add_argument("public_key", type=Path)
    te.set_defaults(func=_trusted_entity)

    sw = sub.add_parser("site", help="site: the worker beside `flower-supernode --isolation process`; runs only "
                        "signed apps and keeps each run warm between messages")
    sw.add_argument("--runtime-api", default="127.0.0.1:9094", help="the SuperNode's Runtime API (its --port)")
    sw.add_argument("--trusted-entities", type=Path, required=True,
                    help="YAML of publisher keys this site trusts, in Flower's trusted-entities format")
    sw.add_argument("--root-certificates", type=Path, default=None, help="CA of the Runtime API when it serves TLS")
    sw.add_argument("--auth-secret-file", type=Path, default=None,
                    help="the secret file also given to the SuperNode as --superexec-auth-secret-file")
    sw.add_argument("--spare-after-idle-s", type=float, default=60.0,
                    help="keep an app host ready with the libraries imported, started at once and again after this "
                         "many idle seconds, so a run's first message does not pay the imports (memory: a few hundred "
                         "MB); 0 turns it off")
    sw.set_defaults(func=_site)

    sn = sub.add_parser("supernode", help="site: Flower's flower-supernode with its idle waits capped at --poll-s "
                        "(arguments after -- are flower-supernode's)")
    sn.add_argument("--poll-s", type=float, default=0.5,
                    help="longest wait between asking the SuperLink for messages (Flower's own: 3 s)")
    sn.add_argument("--pull-timeout-s", type=float, default=60.0,
                    help="give up a message whose content the SuperLink no longer has (Flower's own: 7200 s)")
    sn.add_argument("--heartbeat-s", type=float, default=10.0,
                    help="the heartbeat interval this SuperNode declares; the SuperLink counts it offline after two "
                         "missed (Flower's own: 30 s, so a minute)")
    sn.add_argument("supernode_args", nargs=argparse.REMAINDER)
    sn.set_defaults(func=_supernode)

    fp = sub.add_parser("fleet-proxy", help="coordinator: an nginx.conf that serves only the Fleet API on the "
                        "public address (the SuperLink stays on 127.0.0.1 with its Control API)")
    fp.add_argument("--listen", required=True, help="the public host:port the sites dial")
    fp.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink's --host:--port")
    fp.add_argument("--cert", type=Path, required=True, help="the SuperLink's certificate (server.pem)")
    fp.add_argument("--key", type=Path, required=True, help="its private key (server.key)")
    fp.add_argument("--ca", type=Path, required=True, help="the CA that signed it (ca.crt)")
    fp.set_defaults(func=_fleet_proxy)

    cp = sub.add_parser("compare", help="runs or a sweep side by side: table (compare.csv), frontier.png, report.html")
    cp.add_argument("dirs", nargs="+", type=Path, help="run directories, or a sweep's multirun/DATE/TIME")
    cp.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep directory, else .)")
    cp.set_defaults(func=_compare)

    rp = sub.add_parser("report", help="(re)write a run directory's report.html")
    rp.add_argument("run_dir", type=Path)
    rp.set_defaults(func=_report)

    t = sub.add_parser("app-config", help="check (or --write) pyproject's Flower run config against conf/")
    t.add_argument("--write", action="store_true")
    t.set_defaults(func=_app_config)

    args = parser.parse_args(argv)
    if getattr(args, "host", 0) is None:
        args.host = ["127.0.0.1", "localhost"]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
