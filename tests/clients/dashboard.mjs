// Loads the live dashboard in headless Chromium, reads the numbers it shows, waits for
// the page's next poll to show `expectUsers` users in total, and saves screenshots.
// Prints {"before": {...}, "after": {...}} as one JSON line.
//
//   node dashboard.mjs DASHBOARD_URL SCREENSHOT_PATH EXPECT_USERS_AFTER
import { chromium } from "playwright-core";

const [url, screenshot, expectAfter] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

// Every card's table: {group: {step: {count, rate, pending, target, attainment}}}, plus
// the bottleneck row of each card and the alerts shown.
function read() {
  const out = { groups: {}, bottleneck: {}, alerts: [] };
  for (const card of document.querySelectorAll(".card[data-group]")) {
    const g = card.dataset.group;
    out.groups[g] = {};
    for (const row of card.querySelectorAll("tr[data-step]")) {
      const cell = (c) => row.querySelector("." + c).textContent;
      out.groups[g][row.dataset.step] = { count: cell("count"), rate: cell("rate"),
        pending: cell("pending"), target: cell("target"), attainment: cell("attainment") };
      if (row.classList.contains("bottleneck")) out.bottleneck[g] = row.dataset.step;
    }
  }
  out.alerts = [...document.querySelectorAll(".alert")].map((a) => a.textContent);
  out.as_of = document.body.dataset.asOf;
  out.live = document.getElementById("live").textContent;
  return out;
}

const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1300, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.asOf);
  result.before = await page.evaluate(read);
  await page.screenshot({ path: screenshot, fullPage: true });
  // The test posts more events now; wait for a poll that shows them.
  process.stdout.write("READY\n");
  await page.waitForFunction((n) => {
    const cell = document.querySelector('.card[data-group=""] tr[data-step] .count');
    return cell && cell.textContent === Number(n).toLocaleString("en-US");
  }, expectAfter, { timeout: 30000 });
  result.after = await page.evaluate(read);
  await page.screenshot({ path: screenshot.replace(/\.png$/, "-refreshed.png"), fullPage: true });
  result.errors = errors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
