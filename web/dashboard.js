// Funnelhouse live dashboard: polls the campaign endpoints and draws them with ECharts.
// Served by the binary at /assets/dashboard.js; works offline (no CDN).
(function () {
  "use strict";
  var POLL_MS = 5000;
  var params = new URLSearchParams(location.search);
  var token = params.get("token");
  var campaigns = [];
  var charts = [];
  var trendChart = null;
  var timer = null;

  var $ = function (id) { return document.getElementById(id); };
  var fmt = function (n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); };
  var pct = function (r) { return r == null ? "–" : (r * 100).toFixed(1) + "%"; };
  var esc = function (s) {
    return String(s).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; });
  };

  function api(path, body) {
    var sep = path.indexOf("?") < 0 ? "?" : "&";
    var headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    return fetch(path + sep + "_=" + Date.now(), {
      method: body ? "POST" : "GET", headers: headers, body: body ? JSON.stringify(body) : undefined
    }).then(function (r) {
      return r.json().then(function (j) {
        if (!r.ok) throw new Error(j.error || r.statusText);
        return j;
      });
    });
  }

  function stepName(s) { return typeof s === "string" ? s : s.event; }

  function current() {
    return campaigns.find(function (c) { return c.name === $("campaign").value; });
  }

  function barOption(steps, g) {
    var bottleneck = g.bottleneck;
    return {
      animation: false,
      grid: { left: 70, right: 96, top: 6, bottom: 6 },
      xAxis: { type: "value", show: false, max: function (v) { return Math.max(v.max, 1); } },
      yAxis: { type: "category", inverse: true, data: steps, axisTick: { show: false },
               axisLine: { show: false }, axisLabel: { color: "#1d2433" } },
      series: [
        { name: "reached", type: "bar", stack: "u", barWidth: "60%",
          data: g.counts.map(function (c, i) {
            return { value: c, itemStyle: { color: i === bottleneck ? "#d9453b" : "#3b6fd8" } };
          }),
          label: { show: true, position: "insideLeft", color: "#fff", formatter: function (p) { return p.value ? fmt(p.value) : ""; } } },
        { name: "pending", type: "bar", stack: "u", data: g.pending, itemStyle: { color: "#a9c1f2" },
          label: { show: true, position: "right", color: "#6b7385",
                   formatter: function (p) { return p.value ? "+" + fmt(p.value) + " pending" : ""; } } },
        { name: "target", type: "scatter", symbol: "rect", symbolSize: [3, 22], itemStyle: { color: "#1d2433" },
          data: (g.targets || []).map(function (t) { return t == null ? null : t; }) }
      ],
      tooltip: { trigger: "axis", axisPointer: { type: "shadow" } }
    };
  }

  function table(steps, g) {
    var rows = steps.map(function (s, i) {
      var att = g.attainment ? g.attainment[i] : null;
      var cls = att == null ? "" : att >= 1 ? "good" : "bad";
      return '<tr data-step="' + esc(s) + '"' + (i === g.bottleneck ? ' class="bottleneck"' : "") + ">" +
        "<td>" + esc(s) + "</td>" +
        '<td class="count">' + fmt(g.counts[i]) + "</td>" +
        '<td class="rate">' + (i === 0 ? "" : pct(g.step_conversion[i])) + "</td>" +
        '<td class="pending">' + (i === 0 ? "" : fmt(g.pending[i])) + "</td>" +
        '<td class="target">' + fmt(g.targets ? g.targets[i] : null) + "</td>" +
        '<td class="attainment ' + cls + '">' + pct(att) + "</td></tr>";
    }).join("");
    return "<table><tr><th>step</th><th>users</th><th>step rate</th><th>pending</th><th>target</th><th>attained</th></tr>" +
      rows + "</table>";
  }

  function card(title, steps, g, extraClass, value) {
    var el = document.createElement("div");
    el.className = "card " + (extraClass || "");
    el.dataset.group = value;
    var neck = g.bottleneck == null ? "" : "bottleneck: " + esc(steps[g.bottleneck]);
    el.innerHTML = "<h2><span>" + esc(title) + "</span><small>" + fmt(g.counts[0]) + " users · " +
      pct(g.conversion[g.conversion.length - 1]) + " overall" + (neck ? " · " + neck : "") +
      '</small></h2><div class="chart"></div>' + table(steps, g);
    return el;
  }

  function renderFunnel(f) {
    charts.forEach(function (c) { c.dispose(); });
    charts = [];
    var cards = $("cards");
    cards.innerHTML = "";
    var steps = f.steps;
    var groups = [{ title: "All channels", g: f.total, cls: "total", value: "" }].concat(
      f.groups.map(function (g) { return { title: g.value === "" ? "(no channel)" : g.value, g: g, value: g.value }; }));
    groups.forEach(function (x) {
      var el = card(x.title, steps, x.g, x.cls, x.value);
      cards.appendChild(el);
      var chart = echarts.init(el.querySelector(".chart"));
      chart.setOption(barOption(steps, x.g));
      charts.push(chart);
    });
    $("window").textContent = "window " + Math.round(f.window_seconds / 3600) + " h · as of " +
      new Date(f.as_of).toLocaleTimeString("en-GB");
    $("pace").innerHTML = f.elapsed == null ? "" :
      'campaign time <span class="pace"><i style="width:' + (f.elapsed * 100).toFixed(1) + '%"></i></span> ' + pct(f.elapsed);
  }

  function renderAlerts(a) {
    $("alerts").innerHTML = a.alerts.map(function (x) {
      return '<div class="alert">⚠ <b>' + esc(x.channel || "(no channel)") + "</b>: " + esc(x.step) +
        " step rate " + pct(x.observed) + " is below " + pct(x.threshold) + " (" + fmt(x.users) +
        " users) since " + new Date(x.since).toLocaleTimeString("en-GB") + "</div>";
    }).join("");
  }

  function renderTrend(c, t) {
    if (!trendChart) trendChart = echarts.init($("trend"));
    var steps = c.steps.map(stepName);
    trendChart.setOption({
      animation: false,
      legend: { top: 0 },
      grid: { left: 50, right: 20, top: 30, bottom: 30 },
      tooltip: { trigger: "axis" },
      xAxis: { type: "time" },
      yAxis: { type: "value" },
      series: steps.map(function (s, i) {
        return { name: s, type: "line", showSymbol: false,
                 data: t.buckets.map(function (b) { return [b.start, b.counts[i]]; }) };
      })
    }, true);
  }

  function refresh() {
    clearTimeout(timer);
    var c = current();
    if (!c) return;
    var name = encodeURIComponent(c.name);
    // The campaign's own question (its start/end, hourly) is kept live by the server,
    // so this poll costs no scan; the chart shows the last 7 days of it.
    Promise.all([
      api("/v1/campaigns/" + name + "/funnel"),
      api("/v1/campaigns/" + name + "/alerts"),
      api("/v1/funnel/trend", { campaign: c.name, steps: c.steps, window: c.window,
                                interval: "1h", from: c.start || undefined, to: c.end || undefined })
    ]).then(function (r) {
      var now = Date.now();
      r[2].buckets = r[2].buckets.filter(function (b) {
        var t = Date.parse(b.start);
        return t >= now - 7 * 864e5 && t <= now;
      });
      renderFunnel(r[0]);
      renderAlerts(r[1]);
      renderTrend(c, r[2]);
      $("live").textContent = "live · updated " + new Date().toLocaleTimeString("en-GB");
      $("live").className = "live";
      document.body.dataset.asOf = r[0].as_of;
    }).catch(function (e) {
      $("live").textContent = "not updated: " + e.message;
      $("live").className = "live stale";
    }).then(function () { timer = setTimeout(refresh, POLL_MS); });
  }

  api("/v1/campaigns").then(function (r) {
    campaigns = r.campaigns.filter(function (c) { return c.steps; });
    if (!campaigns.length) {
      $("cards").innerHTML = '<div class="empty">No campaign with a funnel in the config: add <code>[[campaigns]]</code> ' +
        "to funnelhouse.toml, or start with <code>funnelhouse serve --demo</code>.</div>";
      return;
    }
    $("campaign").innerHTML = campaigns.map(function (c) {
      return "<option>" + esc(c.name) + "</option>";
    }).join("");
    var wanted = params.get("campaign");
    if (wanted) $("campaign").value = wanted;
    $("campaign").onchange = refresh;
    refresh();
  }).catch(function (e) {
    $("cards").innerHTML = '<div class="empty error">' + esc(e.message) + "</div>";
  });
  window.addEventListener("resize", function () {
    charts.concat(trendChart ? [trendChart] : []).forEach(function (c) { c.resize(); });
  });
})();
