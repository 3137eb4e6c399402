//! The web dashboard (`/ui`) in a real headless Chromium: the API key entered
//! once, the queue and runners pages, a job submitted through the page seen
//! going to `completed` with its output image shown, a dead letter retried
//! from its page. Screenshots go to `<target>/ui-screenshots/` for a person
//! to look at. Skipped, saying so, where Chromium is not installed.

use std::time::Duration;

use comfyq_tests::browser::{Browser, find_chromium, screenshot_dir};
use comfyq_tests::stack::{API_KEY, invert_workflow};
use comfyq_tests::{TestStack, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_on_the_dashboard_completes_with_its_image_shown() {
    let stack = TestStack::start().await;
    shell_is_public_and_revalidated(&stack).await;
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "SKIPPED the browser part of a_job_submitted_on_the_dashboard_completes_with_its_image_shown: \
             Chromium not found \
             (install Debian's `chromium`: `bash deploy/dev.sh setup`; or set CHROMIUM_BIN)"
        );
        return;
    };
    let browser = Browser::launch(&chromium).await;
    let page = browser.new_page(1280, 900).await;
    let shots = screenshot_dir();
    let ui = format!("{}/ui", stack.api);

    // The shell needs no key; the API calls it makes do, and say so.
    page.goto(&ui).await;
    let banner = page
        .wait_for(
            "the missing-key banner",
            "(() => { const b = document.getElementById('banner'); return !b.hidden && b.textContent; })()",
            WAIT,
        )
        .await;
    assert!(
        banner
            .as_str()
            .is_some_and(|b| b.contains("HTTP 401") && b.contains("API key")),
        "{banner}"
    );

    // Entered once, kept in localStorage, sent from then on.
    page.eval(&format!(
        "document.getElementById('api-key').value = {}; document.getElementById('save-key').click()",
        json!(API_KEY)
    ))
    .await;
    assert_eq!(
        page.eval("localStorage.getItem('comfyq.apiKey')").await,
        json!(API_KEY)
    );
    let queue = page
        .wait_for(
            "the queue table",
            "document.querySelector('main table') && document.querySelector('main').innerText",
            WAIT,
        )
        .await;
    let queue = queue.as_str().unwrap_or_default();
    for expected in [
        "POOL",
        "default",
        "high",
        "normal",
        "low",
        "1 runner(s), 1 ready",
    ] {
        assert!(queue.contains(expected), "no {expected:?} in {queue}");
    }
    page.screenshot(&shots.join("queue.png")).await;

    page.eval("location.hash = '#/runners'").await;
    let runners = page
        .wait_for(
            "runner-0 listed",
            "document.querySelector('main table') && document.querySelector('main').innerText",
            WAIT,
        )
        .await;
    let runners = runners.as_str().unwrap_or_default();
    assert!(
        runners.contains("runner-0") && runners.contains("ready"),
        "{runners}"
    );
    page.screenshot(&shots.join("runners.png")).await;

    // Submit through the page: it opens the job, which completes with its
    // output image decoded at the workflow's size.
    page.eval("location.hash = '#/jobs'").await;
    page.wait_for(
        "the submit form",
        "document.getElementById('submit-workflow')",
        WAIT,
    )
    .await;
    let mut workflow = invert_workflow(96);
    workflow["1"]["inputs"]["color"] = json!(0xFF8000); // Orange, inverted to blue.
    let job = json!({
        "workflow": workflow,
        "metadata": {"from": "dashboard"},
        "webhook": {"url": stack.webhooks.url("/dashboard")},
    });
    page.eval(&format!(
        "document.querySelector('details.panel').open = true; \
         document.getElementById('submit-workflow').value = {}; \
         document.getElementById('submit-button').click()",
        json!(job.to_string())
    ))
    .await;
    let id = page
        .wait_for(
            "the job page",
            "(location.hash.match(/^#\\/jobs\\/([0-9a-f-]{36})$/) || [])[1] || null",
            WAIT,
        )
        .await
        .as_str()
        .expect("job id in the URL")
        .to_owned();
    page.wait_for(
        "the job completed on the page",
        "document.querySelector('#job-status[data-status=completed]')",
        WAIT,
    )
    .await;
    let image_width = page
        .wait_for(
            "the output image decoded",
            "(() => { const img = document.querySelector('#job-outputs img'); \
             return img && img.complete && img.naturalWidth; })()",
            WAIT,
        )
        .await;
    assert_eq!(image_width, json!(96));
    let timeline = page
        .wait_for(
            "the timeline up to completed",
            "(() => { const t = document.getElementById('job-timeline').innerText; \
             return t.includes('completed') && t; })()",
            WAIT,
        )
        .await;
    let timeline = timeline.as_str().unwrap_or_default();
    // (`dispatched` may be skipped: a runner's start can overtake it.)
    for state in ["accepted", "queued", "running", "completed"] {
        assert!(
            timeline.contains(state),
            "no {state} in the timeline: {timeline}"
        );
    }
    assert_eq!(
        page.eval("document.getElementById('job-progress').value")
            .await,
        json!(1)
    );
    assert_eq!(
        page.eval("document.getElementById('cancel-job').disabled")
            .await,
        json!(true),
        "a finished job cannot be cancelled"
    );
    let deliveries = page
        .wait_for(
            "the webhook delivered",
            "(() => { const w = document.getElementById('job-webhooks').innerText; \
             return w.includes('delivered') && w; })()",
            WAIT,
        )
        .await;
    assert!(
        deliveries
            .as_str()
            .is_some_and(|d| d.contains("job.completed") && d.contains("HTTP 200")),
        "{deliveries}"
    );
    page.screenshot(&shots.join("job.png")).await;
    // The page's job is the API's.
    let api_job = stack.job(&id).await;
    assert_eq!(api_job["status"], "completed", "{api_job:#}");
    assert_eq!(api_job["metadata"], json!({"from": "dashboard"}));

    // The jobs list shows it.
    page.eval("location.hash = '#/jobs'").await;
    page.wait_for(
        "the job in the list",
        &format!("document.querySelector('main a[href=\"#/jobs/{id}\"]')"),
        WAIT,
    )
    .await;
    page.screenshot(&shots.join("jobs.png")).await;

    // A dead letter, retried from its page, completes.
    let max = stack.nats_config().dispatch_max_deliver as usize;
    stack.sim.inject(comfy_sim::Failure::oom(), max);
    let dead = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let dead_id = dead["id"].as_str().expect("id").to_owned();
    eventually(WAIT, "a dead letter", async || {
        let page: Value = stack
            .http
            .get(format!("{}/v1/dead-letters", stack.api))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (page["dead_letters"].as_array()?.len() == 1).then_some(())
    })
    .await;
    page.eval("location.hash = '#/dead-letters'").await;
    let retry_button = format!("document.querySelector('button.retry[data-job=\"{dead_id}\"]')");
    page.wait_for("the dead letter's retry button", &retry_button, WAIT)
        .await;
    page.screenshot(&shots.join("dead-letters.png")).await;
    page.eval(&format!("{retry_button}.click()")).await;
    page.wait_for(
        "the requeue confirmed and the list emptied",
        "(() => { const t = document.querySelector('main').innerText; \
         return t.includes('Requeued') && t.includes('No dead letters.'); })()",
        WAIT,
    )
    .await;
    let requeued = stack.wait_finished(&dead_id, WAIT).await;
    assert_eq!(requeued["status"], "completed", "{requeued:#}");

    assert_eq!(
        browser.errors(),
        Vec::<String>::new(),
        "no script or CSP errors"
    );
    println!("dashboard screenshots in {}", shots.display());
    browser.close().await;
    stack.stop().await;
}

/// The shell and its assets need no API key, carry the security headers, and
/// answer 304 to a browser that has them.
async fn shell_is_public_and_revalidated(stack: &TestStack) {
    let anonymous = reqwest::Client::new();
    for (path, content_type) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let url = format!("{}{path}", stack.api);
        let response = anonymous.get(&url).send().await.expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(
            headers["content-type"]
                .to_str()
                .is_ok_and(|t| t.starts_with(content_type)),
            "{path}: {headers:?}"
        );
        assert!(
            headers["content-security-policy"]
                .to_str()
                .is_ok_and(|p| p.contains("script-src 'self'")),
            "{path}: {headers:?}"
        );
        let etag = headers["etag"].clone();
        let again = anonymous
            .get(&url)
            .header("if-none-match", etag)
            .send()
            .await
            .expect("GET again");
        assert_eq!(again.status(), 304, "{path}");
    }
    let shell = anonymous
        .get(format!("{}/ui", stack.api))
        .send()
        .await
        .expect("GET /ui")
        .text()
        .await
        .expect("shell");
    assert!(
        shell.contains("<script src=\"/ui/app.js\" defer>"),
        "{shell}"
    );
    assert!(!shell.contains("{{version}}"), "the version is filled in");
    // The API behind it still wants the key.
    let jobs = anonymous
        .get(format!("{}/v1/jobs", stack.api))
        .send()
        .await
        .expect("GET /v1/jobs");
    assert_eq!(jobs.status(), 401);
}
