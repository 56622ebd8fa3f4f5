"""The Kubernetes API, found as kubectl finds it, and plain JSON requests on it."""

from __future__ import annotations

import os
from typing import Any

import kopf
import kubernetes

# Seconds to connect and for each read of one API request: a hung request would hold the
# handler of its object, and every later event of that object would wait behind it.
REQUEST_TIMEOUT = 10.0


def configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """Where the API is and how to log in: the in-cluster service account, else the
    named kubeconfig, else $KUBECONFIG, else ~/.kube/config."""
    config = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=config)
    else:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    return config


def api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(configuration(kubeconfig))


def is_missing(e: BaseException) -> bool:
    return isinstance(e, kubernetes.client.ApiException) and e.status == 404


class Kube:
    """Plain JSON requests on the kubernetes client's connection (in-cluster or kubeconfig)."""

    def __init__(self, kubeconfig: str | None = None,
                 client: kubernetes.client.ApiClient | None = None) -> None:
        """The API found as kubectl finds it, or through an existing ``client``."""
        self.client = client or kubernetes.client.ApiClient(configuration(kubeconfig))
        self.config = self.client.configuration
        self.answered = False  # the API server has authenticated and served a request

    def connection(self) -> kopf.ConnectionInfo:
        header = (self.config.get_api_key_with_prefix("BearerToken")
                  or self.config.get_api_key_with_prefix("authorization") or "")
        return kopf.ConnectionInfo(
            server=self.config.host, ca_path=self.config.ssl_ca_cert,
            insecure=not self.config.verify_ssl, token=header.split(" ")[-1] or None,
            certificate_path=self.config.cert_file, private_key_path=self.config.key_file)

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        timeout = REQUEST_TIMEOUT if timeout is None else timeout
        c = self.client
        method, url, headers, body, _ = c.param_serialize(
            method, path, body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": "application/json"})
        response = c.call_api(method, url, header_params=headers, body=body,
                              _request_timeout=timeout)
        response.read()
        if response.status < 500 and response.status not in (401, 403):
            self.answered = True  # a 404 or 409 is an answer too
        return c.response_deserialize(response, {"2XX": "object"}).data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body, "application/merge-patch+json")
