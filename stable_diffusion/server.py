"""`hub serving start -m stable_diffusion`: what a request may hold, and the settings PaddleHub leaves out.

PaddleHub's server (paddlehub/serving/app_compat.py) turns the JSON body into the serving method's
keyword arguments. Three things it does not do, added here when the module is loaded by `hub serving`
(PaddleHub's serving code already imported), for both the single-process Flask server and
`--use_multiprocess`'s gunicorn workers:
- a bound on the body's size (Flask reads any body whole; STABLE_DIFFUSION_MAX_BODY_MB, default 32);
- a clear refusal of a body that is not a JSON object (PaddleHub answers a JSON list or string with
  HTTP 500 and a traceback in its log);
- gunicorn's worker timeout (STABLE_DIFFUSION_WORKER_TIMEOUT seconds, default 3600): PaddleHub passes
  gunicorn only `bind` and `workers`, so its default of 30 s killed every request longer than that,
  the first of each worker (the weights' loading) included. gunicorn's own config files and
  GUNICORN_CMD_ARGS are not read by PaddleHub's application class.
"""
import os
import sys

from stable_diffusion.budget import RequestBudget, number_from_environment
from stable_diffusion.images import decode_base64_image

MAX_BODY_ENV_VAR, MAX_BODY_MB = "STABLE_DIFFUSION_MAX_BODY_MB", 32
WORKER_TIMEOUT_ENV_VAR, WORKER_TIMEOUT_S = "STABLE_DIFFUSION_WORKER_TIMEOUT", 3600
ROUTE = "/predict/stable_diffusion"


def serve_request(generate_image, serving_keys, text_prompts=None, **kwargs):
    """JSON body's keys -> generate_image(...), within the served budget; ValueError says what to fix."""
    if "output_dir" in kwargs:
        raise ValueError("output_dir cannot be set through serving: the server writes no files; "
                         "save the returned images on the client")
    unknown = sorted(set(kwargs) - set(serving_keys))
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; accepted: {', '.join(serving_keys)}")
    if text_prompts is None:
        raise ValueError("the request body needs text_prompts (a string or a list of strings)")
    for name in ("init_image", "mask_image"):  # base64 here: a client never names a server file
        if kwargs.get(name) is not None:
            kwargs[name] = decode_base64_image(kwargs[name], name)
    return generate_image(text_prompts=text_prompts, output_dir=None, names_only=True,
                          budget=RequestBudget.from_environment(served=True), **kwargs)


def refusal(message, status):
    """PaddleHub's answer shape (status '101' as for a refused request), with an HTTP status."""
    from flask import jsonify
    response = jsonify({"status": "101", "msg": message, "results": ""})
    response.status_code = status
    return response


def check_body():
    """Flask before_request: the body of a predict call is a JSON object within the size limit."""
    from flask import request
    if request.method != "POST" or request.path != ROUTE:
        return None
    limit = request.max_content_length
    if limit is not None and (request.content_length or 0) > limit:
        return refusal(f"the request body is {request.content_length} bytes, over the server's limit of "
                       f"{limit}; send smaller images, or the operator raises {MAX_BODY_ENV_VAR}", 413)
    if not request.is_json:
        return refusal("send the body as JSON with the header Content-Type: application/json", 415)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return refusal("the request body must be a JSON object such as {\"text_prompts\": \"a red boat\"}; got "
                       + ("malformed JSON" if body is None else f"a JSON {type(body).__name__}"), 400)
    return None


def adjust_paddlehub_serving():
    """Wrap PaddleHub's Flask app factory and gunicorn application once, if `hub serving` is running."""
    app_compat = sys.modules.get("paddlehub.serving.app_compat")
    if app_compat is None or getattr(app_compat.create_app, "adjusted_by_stable_diffusion", False):
        return
    max_body_bytes = int((number_from_environment(MAX_BODY_ENV_VAR) or MAX_BODY_MB) * 2 ** 20)
    timeout = number_from_environment(WORKER_TIMEOUT_ENV_VAR, zero_allowed=True)
    worker_timeout = int(WORKER_TIMEOUT_S if timeout is None else timeout)
    create_app = app_compat.create_app

    def create_app_adjusted(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
        app.before_request(check_body)
        return app

    create_app_adjusted.adjusted_by_stable_diffusion = True
    app_compat.create_app = create_app_adjusted

    http_server = sys.modules.get("paddlehub.serving.http_server")
    application = getattr(http_server, "StandaloneApplication", None)
    if application is not None:
        load_config = application.load_config

        def load_config_adjusted(self):
            load_config(self)
            if "timeout" not in self.options:
                self.cfg.set("timeout", worker_timeout)  # 0: none
                self.cfg.set("graceful_timeout", max(30, min(worker_timeout, 300)))

        application.load_config = load_config_adjusted
