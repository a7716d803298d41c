"""A Ray cluster: the Ray Jobs client and the KubeRay manifests."""
