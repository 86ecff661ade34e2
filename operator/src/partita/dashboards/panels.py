"""The few panel shapes Partita's dashboards use, built with Grafana's typed builders.

Every panel queries the dashboard's `datasource` variable, has a unit and a description, and
every range selector is `[$__rate_interval]`, so the panels follow whatever scrape interval
the user's Prometheus has.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"

Query = tuple[str, str]  # (PromQL, legend)


def _targets(queries: tuple[Query, ...], *, instant: bool = False) -> list[prometheus.Dataquery]:
    out = []
    for i, (expr, legend) in enumerate(queries):
        q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
        q = q.datasource(DATASOURCE)
        if instant:
            q = q.instant().format(PromQueryFormat.TABLE)
        out.append(q)
    return out


def series(
    title: str, description: str, unit: str, *queries: Query, width: int = 12, height: int = 8
) -> timeseries.Panel:
    """A time series panel, its legend a table with the last and the largest value."""
    legend = (
        VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(_targets(queries))  # type: ignore[arg-type]
        .legend(legend)
        .span(width)
        .height(height)
    )


def single(
    title: str,
    description: str,
    unit: str,
    *queries: Query,
    width: int = 6,
    height: int = 4,
    mappings: list[model.ValueMapping] | None = None,
) -> stat.Panel:
    """A stat panel showing the last value of each series."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(_targets(queries))  # type: ignore[arg-type]
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .span(width)
        .height(height)
    )
    if mappings:
        panel = panel.mappings(mappings)
    return panel


def rows(
    title: str, description: str, unit: str, *queries: Query, width: int = 24, height: int = 8
) -> table.Panel:
    """A table of the labels of the series the queries return now (one row per series)."""
    return (
        table.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(_targets(queries, instant=True))  # type: ignore[arg-type]
        .span(width)
        .height(height)
    )


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(
    name: str, label: str, query: str, *, multi: bool = False
) -> dashboard.QueryVariable:
    """A variable listing the values of label `name` in `query`'s series (label_values)."""
    var = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({query}, {name})")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        var = var.multi(True).include_all(True)
    return var


def boolean(false: str, true: str) -> list[model.ValueMapping]:
    """0/1 shown as words."""
    return [
        model.ValueMap(
            options={
                "0": model.ValueMappingResult(text=false, color="red", index=0),
                "1": model.ValueMappingResult(text=true, color="green", index=1),
            }
        )
    ]


def new_dashboard(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["partita"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource_variable())
    )
