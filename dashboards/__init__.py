"""moxco.dashboards: Grafana dashboards as code, their generated JSON and the push to Grafana.

Lives in the top-level ``dashboards/`` folder and installs as ``moxco.dashboards``.
"""
