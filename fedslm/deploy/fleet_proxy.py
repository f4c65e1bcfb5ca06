"""The coordinator's one public port, for sites only: an nginx front that passes Flower's
Fleet API (`/v1/fleet/`, all a SuperNode calls) to a SuperLink bound to 127.0.0.1 and
answers everything else, the Control API (`flwr run`, `flwr supernode register`) and the
Runtime API, with 403.

flwr 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port (`--host`,
`--port`; `--control-api-address` is deprecated) and its Control API authenticates no one
without Flower's account authentication, so a SuperLink bound to a routable address lets
anyone who reaches the port and holds the CA certificate start a run. Flower has no switch
to split them; a path-filtering reverse proxy does, with the SuperLink's own certificate.
Operators run `flwr` on the coordinator's host (or through an SSH tunnel to 127.0.0.1).
"""

from __future__ import annotations

from pathlib import Path


def nginx_config(listen: str, superlink: str, cert: Path, key: Path, ca: Path, prefix: Path | None = None,
                 run_as_root: bool = False) -> str:
    """A complete nginx.conf. `listen` is the public host:port the sites dial (the name the
    certificate is for), `superlink` the SuperLink's 127.0.0.1:port. `prefix` puts the pid,
    logs and temporary files in one directory (tests); without it nginx's defaults apply."""
    # nginx checks the SuperLink's certificate against the public name: the certificate the
    # sites already trust (`fedslm certs --host PUBLIC --host 127.0.0.1`)
    host = listen.rsplit(":", 1)[0]
    local = "" if prefix is None else f"""pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
"""
    temp = "" if prefix is None else f"""    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""
    return f"""# Written by fedslm (fedslm/deploy/fleet_proxy.py): sites reach the Fleet API only.
{"user root;" if run_as_root else ""}
{local}worker_processes 1;
events {{ worker_connections 1024; }}
http {{
{temp}    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        # adapters and model-sized objects travel as request bodies
        client_max_body_size 2g;
        location /v1/fleet/ {{
            proxy_pass https://{superlink};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {host};
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        # the Control API (runs, node registration) and the Runtime API stay on the coordinator
        location / {{ return 403 "only the Fleet API is served on this address\\n"; }}
    }}
}}
"""
