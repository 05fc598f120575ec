"""Building the Kubernetes API client from ``--kubeconfig`` or the in-cluster service account."""

from __future__ import annotations


class KubeConfigError(Exception):
    """No usable Kubernetes credentials; the message says what to pass instead."""


def make_api_client(kubeconfig: str = None):
    """A ``kubernetes.client.ApiClient``: from the kubeconfig file if given, else in-cluster.

    In a pod, the in-cluster config uses the mounted service-account token and
    CA (``/var/run/secrets/kubernetes.io/serviceaccount``) and the
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` environment.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    # one connection per watch thread (mesh.control.kube.watch) plus Events and TokenReviews, without
    # urllib3 discarding connections beyond its default pool size (5 per CPU)
    configuration.connection_pool_maxsize = 32
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError, TypeError, ValueError) as error:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise KubeConfigError(
            f"cannot load Kubernetes credentials from {where}: {error}; run inside a pod with a service "
            "account, or pass --kubeconfig FILE") from None
    return client.ApiClient(configuration)
