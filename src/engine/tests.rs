//! Engine tests with scripted sections and paused tokio time: isolation, coalescing,
//! backoff, requested wake-ups, error classes, the facts hand-off and shutdown.

use super::*;
use crate::document::{ApiVersion, Mode, Node};
use converge_core::ContainerFacts;
use std::sync::Mutex;

fn doc(generation: u64) -> Arc<Document> {
    Arc::new(Document {
        api_version: ApiVersion::V1,
        node: Node {
            id: "n1".into(),
            mode: Mode::Worker,
        },
        generation,
        issued_at: Utc::now(),
        containers: None,
        networks: None,
        registries: None,
        images: None,
        wireguard: None,
        firewall: None,
        dns: None,
        routes: None,
        backups: None,
        metadata: None,
        agent: None,
        secrets: None,
    })
}

type Behaviour = dyn Fn(u64, &Facts, usize) -> PassResult + Send + Sync;

/// A section whose passes follow a script; it records (generation, facts) per pass.
struct Scripted {
    name: &'static str,
    watches: bool,
    delay: Duration,
    behaviour: Box<Behaviour>,
    seen: Arc<Mutex<Vec<(u64, Facts)>>>,
}

impl Scripted {
    fn new(
        name: &'static str,
        behaviour: impl Fn(u64, &Facts, usize) -> PassResult + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            watches: false,
            delay: Duration::ZERO,
            behaviour: Box::new(behaviour),
            seen: Default::default(),
        }
    }
}

impl Section for Scripted {
    fn name(&self) -> &'static str {
        self.name
    }
    fn watches_facts(&self) -> bool {
        self.watches
    }
    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
    fn pass(
        &self,
        doc: Arc<Document>,
        facts: Arc<Facts>,
        _dry_run: bool,
    ) -> BoxFuture<'static, PassResult> {
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.push((doc.generation, (*facts).clone()));
            seen.len()
        };
        let result = (self.behaviour)(doc.generation, &facts, n);
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            result
        })
    }
}

fn ran(changes: Vec<Change>, outcomes: Vec<ObjectOutcome>) -> PassResult {
    PassResult::Ran {
        changes,
        waiting: vec![],
        outcomes,
        facts: None,
        notes: vec![],
        requeue_after: None,
        owned: None,
    }
}

fn converged() -> PassResult {
    ran(vec![], vec![])
}

/// A converged pass that also waits, publishes or asks for a wake-up.
fn converged_with(
    waiting: Vec<Waiting>,
    facts: Option<FactsUpdate>,
    requeue_after: Option<Duration>,
) -> PassResult {
    PassResult::Ran {
        changes: vec![],
        waiting,
        outcomes: vec![],
        facts,
        notes: vec![],
        requeue_after,
        owned: None,
    }
}

fn thing(id: &str) -> Change {
    Change::new(converge_core::Op::Create, "thing", id)
}

fn cfg() -> EngineConfig {
    EngineConfig {
        resync: Duration::from_secs(60),
        ..Default::default()
    }
}

async fn last_state(
    rx: &mut mpsc::UnboundedReceiver<Report>,
    name: &str,
    want: State,
) -> ReconcilerStatus {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("no report")
            .expect("closed");
        if r.status.reconciler == name && r.status.state == want {
            return r.status;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconciler_does_not_block_another() {
    let bad = Scripted::new("bad", |_, _, _| panic!("boom"));
    let good = Scripted::new("good", |_, _, _| converged());
    let bad_seen = bad.seen.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(bad), Arc::new(good)], cfg(), Some(doc(1)), tx);
    let s = last_state(&mut rx, "good", State::Converged).await;
    assert_eq!(s.observed_generation, Some(1));
    let s = last_state(&mut rx, "bad", State::Degraded).await;
    assert!(s.message.contains("panicked: boom"), "{}", s.message);
    // The failing one is retried with growing delays, not hot-looped.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let passes = bad_seen.lock().unwrap().len();
    assert!((3..=8).contains(&passes), "{passes} passes in 10 s");
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_failing_object_degrades_but_others_are_reported_applied() {
    let s = Scripted::new("objs", |_, _, n| {
        if n == 1 {
            ran(
                vec![thing("a"), thing("b")],
                vec![
                    ObjectOutcome::ok("thing a"),
                    ObjectOutcome::failed("thing b", "no space"),
                ],
            )
        } else {
            converged()
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let st = last_state(&mut rx, "objs", State::Degraded).await;
    assert_eq!(st.message, "thing b failed; 1 of 2 objects converged");
    assert_eq!(
        st.object_errors,
        vec![ObjectError {
            object: "thing b".into(),
            error: "no space".into(),
            retry_in_secs: None,
        }]
    );
    // The backoff retry converges it.
    last_state(&mut rx, "objs", State::Converged).await;
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn documents_pushed_during_a_pass_coalesce_to_the_newest() {
    let mut slow = Scripted::new("slow", |_, _, _| converged());
    slow.delay = Duration::from_secs(5);
    let seen = slow.seen.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(slow)], cfg(), Some(doc(1)), tx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for g in 2..=10 {
        engine.push(doc(g));
    }
    loop {
        let st = last_state(&mut rx, "slow", State::Converged).await;
        if st.observed_generation == Some(10) {
            break;
        }
    }
    let gens: Vec<u64> = seen.lock().unwrap().iter().map(|(g, _)| *g).collect();
    assert_eq!(gens, vec![1, 10]);
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_documents_verified_one_after_another_is_not_degraded() {
    // Every pass applies the generation it was given (one change) unless it applied it
    // already; a new document arrives during every pass, so each verify pass meets a
    // newer generation and applies again, far more than `max_verify_passes` times.
    let applied = Arc::new(Mutex::new(0u64));
    let last = applied.clone();
    let mut s = Scripted::new("burst", move |g, _, _| {
        let mut last = last.lock().unwrap();
        if *last == g {
            converged()
        } else {
            *last = g;
            ran(vec![thing("x")], vec![ObjectOutcome::ok("thing x")])
        }
    });
    s.delay = Duration::from_millis(100);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    for g in 2..=20 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        engine.push(doc(g));
    }
    loop {
        let r = tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("no report")
            .expect("closed");
        assert_ne!(r.status.state, State::Degraded, "{}", r.status.message);
        if r.status.state == State::Converged && r.status.observed_generation == Some(20) {
            break;
        }
    }
    assert_eq!(*applied.lock().unwrap(), 20);
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn foreign_changes_after_every_apply_are_degraded() {
    // Someone else undoes every apply: verify passes of one generation keep finding
    // changes, and after `max_verify_passes` the reconciler says so.
    let s = Scripted::new("fight", |_, _, _| {
        ran(vec![thing("x")], vec![ObjectOutcome::ok("thing x")])
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let st = last_state(&mut rx, "fight", State::Degraded).await;
    assert!(
        st.message
            .contains("something else keeps changing the host"),
        "{}",
        st.message
    );
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn published_facts_trigger_watchers() {
    let publisher = Scripted::new("containers", |g, _, _| {
        let mut c = std::collections::BTreeMap::new();
        c.insert(
            "web".to_string(),
            ContainerFacts {
                addresses: vec![format!("10.88.0.{g}").parse().unwrap()],
                running: true,
            },
        );
        converged_with(vec![], Some(FactsUpdate::Containers(c)), None)
    });
    let mut watcher = Scripted::new("dns", |_, _, _| converged());
    watcher.watches = true;
    let seen = watcher.seen.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(
        vec![Arc::new(publisher), Arc::new(watcher)],
        cfg(),
        Some(doc(1)),
        tx,
    );
    last_state(&mut rx, "containers", State::Converged).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = |seen: &Arc<Mutex<Vec<(u64, Facts)>>>| {
        seen.lock()
            .unwrap()
            .last()
            .and_then(|(_, f)| f.containers.get("web").map(|c| c.addresses[0].to_string()))
    };
    assert_eq!(addr(&seen).as_deref(), Some("10.88.0.1"));
    assert_eq!(
        engine.facts().containers["web"].addresses[0].to_string(),
        "10.88.0.1"
    );
    // A new document changes the published address; the watcher runs again with it.
    engine.push(doc(2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(addr(&seen).as_deref(), Some("10.88.0.2"));
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn resync_repairs_drift_periodically() {
    let s = Scripted::new("drifty", |_, _, _| converged());
    let seen = s.seen.clone();
    let (tx, _rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    tokio::time::sleep(Duration::from_secs(200)).await;
    let passes = seen.lock().unwrap().len();
    // 1 initial + one per ~60 s (±10 %).
    assert!((3..=5).contains(&passes), "{passes}");
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_the_in_flight_pass_finish() {
    let finished = Arc::new(Mutex::new(false));
    let f2 = finished.clone();
    struct Slow(Arc<Mutex<bool>>);
    impl Section for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn watches_facts(&self) -> bool {
            false
        }
        fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
            None
        }
        fn pass(&self, _: Arc<Document>, _: Arc<Facts>, _: bool) -> BoxFuture<'static, PassResult> {
            let done = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                *done.lock().unwrap() = true;
                converged()
            })
        }
    }
    let (tx, _rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(Slow(f2))], cfg(), Some(doc(1)), tx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    engine.shutdown().await;
    assert!(*finished.lock().unwrap());
}

/// Times of the passes so far, in seconds since the section was made.
fn pass_times(times: &Arc<Mutex<Vec<f64>>>) -> Vec<f64> {
    times.lock().unwrap().clone()
}

/// A scripted section that also records when each pass ran (paused clock).
fn timed(
    name: &'static str,
    behaviour: impl Fn(usize) -> PassResult + Send + Sync + 'static,
) -> (Scripted, Arc<Mutex<Vec<f64>>>) {
    let t0 = Instant::now();
    let times = Arc::new(Mutex::new(Vec::new()));
    let t = times.clone();
    let s = Scripted::new(name, move |_, _, n| {
        t.lock().unwrap().push((Instant::now() - t0).as_secs_f64());
        behaviour(n)
    });
    (s, times)
}

#[tokio::test(start_paused = true)]
async fn a_requested_wake_up_fires_at_its_time() {
    let (s, times) = timed("sched", |_| {
        converged_with(vec![], None, Some(Duration::from_secs(7)))
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let st = last_state(&mut rx, "sched", State::Converged).await;
    assert_eq!(st.reason, Some(Reason::Document));
    tokio::time::sleep(Duration::from_secs(22)).await;
    let t = pass_times(&times);
    // At 0, 7, 14, 21 s: before the 60 s resync, exactly on time.
    assert_eq!(t.len(), 4, "{t:?}");
    for (i, at) in t.iter().enumerate() {
        assert!((at - 7.0 * i as f64).abs() < 0.01, "{t:?}");
    }
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_earlier_trigger_runs_before_a_requested_wake_up() {
    let (s, times) = timed("sched", |_| {
        converged_with(vec![], None, Some(Duration::from_secs(30)))
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    last_state(&mut rx, "sched", State::Converged).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    engine.push(doc(2));
    let st = last_state(&mut rx, "sched", State::Converged).await;
    assert_eq!(st.observed_generation, Some(2));
    assert_eq!(st.reason, Some(Reason::Document));
    tokio::time::sleep(Duration::from_secs(36)).await;
    let t = pass_times(&times);
    // 0 (start), 5 (document), 35 (the wake-up the 5 s pass asked for).
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(
        (t[1] - 5.0).abs() < 0.01 && (t[2] - 35.0).abs() < 0.01,
        "{t:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_retries_soon_without_degraded() {
    let s = Scripted::new("flaky", |_, _, n| match n {
        1 => PassResult::Failed {
            error: "observe: daemon restarting".into(),
            transient: true,
        },
        2 => ran(
            vec![thing("a")],
            vec![ObjectOutcome::from_result(
                "thing a",
                Err(converge_core::DriverError::Transient(
                    "ruleset changed meanwhile".into(),
                )),
            )],
        ),
        _ => converged(),
    });
    let seen = s.seen.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let start = Instant::now();
    let st = last_state(&mut rx, "flaky", State::Converged).await;
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(st.reason, Some(Reason::Retry));
    // No report on the way said Degraded.
    while let Ok(r) = rx.try_recv() {
        assert_ne!(r.status.state, State::Degraded, "{:?}", r.status);
    }
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn transient_failures_that_persist_become_degraded() {
    let s = Scripted::new("stuck", |_, _, _| PassResult::Failed {
        error: "observe: still restarting".into(),
        transient: true,
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let st = last_state(&mut rx, "stuck", State::Degraded).await;
    assert!(st.message.contains("still restarting"), "{}", st.message);
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_object_on_its_own_delay_neither_degrades_nor_retries_hot() {
    // Object b crash-loops: it asks to be retried in 30 s; object a converges.
    let (s, times) = timed("objs", |n| match n {
        1 => ran(
            vec![thing("a"), thing("b")],
            vec![
                ObjectOutcome::ok("thing a"),
                ObjectOutcome::from_result(
                    "thing b",
                    Err(converge_core::DriverError::RetryAfter {
                        message: "crash loop back-off".into(),
                        after: Duration::from_secs(30),
                    }),
                ),
            ],
        ),
        // The verify pass: b waits, the plan says so.
        2 => converged_with(
            vec![Waiting::new("thing", "b", "crash loop back-off")
                .retry_after(Duration::from_secs(30))],
            None,
            None,
        ),
        _ => converged(),
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let st = last_state(&mut rx, "objs", State::Converged).await;
    assert_eq!(st.waiting.len(), 1, "{st:?}");
    assert_eq!(st.waiting[0].object, "thing b");
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(pass_times(&times).len(), 2, "no pass before b's delay");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = pass_times(&times);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!((t[2] - 30.0).abs() < 0.01, "{t:?}");
    let st = last_state(&mut rx, "objs", State::Converged).await;
    assert_eq!(st.reason, Some(Reason::Requeue));
    assert!(st.waiting.is_empty());
    while let Ok(r) = rx.try_recv() {
        assert_ne!(r.status.state, State::Degraded, "{:?}", r.status);
    }
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_host_event_names_its_object_in_the_reason() {
    struct Evented(tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<HostEvent>>>);
    impl Section for Evented {
        fn name(&self) -> &'static str {
            "evented"
        }
        fn watches_facts(&self) -> bool {
            false
        }
        fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
            let rx = self.0.try_lock().ok()?.take()?;
            Some(tokio_stream_from(rx))
        }
        fn pass(&self, _: Arc<Document>, _: Arc<Facts>, _: bool) -> BoxFuture<'static, PassResult> {
            Box::pin(async { converged() })
        }
    }
    fn tokio_stream_from(
        mut rx: mpsc::UnboundedReceiver<HostEvent>,
    ) -> BoxStream<'static, HostEvent> {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
    let (etx, erx) = mpsc::unbounded_channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(
        vec![Arc::new(Evented(tokio::sync::Mutex::new(Some(erx))))],
        cfg(),
        Some(doc(1)),
        tx,
    );
    last_state(&mut rx, "evented", State::Converged).await;
    etx.send(HostEvent("container web died".into())).unwrap();
    let st = last_state(&mut rx, "evented", State::Converged).await;
    assert_eq!(
        st.reason,
        Some(Reason::HostEvent("container web died".into()))
    );
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_host_events_during_a_pass_wakes_one_pass() {
    // A source that hands over its backlog one event at a time, each a moment after it
    // is asked for (an HTTP event stream): read only between passes, 100 events that
    // arrived during a pass would wake 100 passes.
    struct Slow {
        events: tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<HostEvent>>>,
        passes: Arc<AtomicU64>,
    }
    impl Section for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn watches_facts(&self) -> bool {
            false
        }
        fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
            let rx = self.events.try_lock().ok()?.take()?;
            Some(
                futures::stream::unfold(rx, |mut rx| async move {
                    let event = rx.recv().await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Some((event, rx))
                })
                .boxed(),
            )
        }
        fn pass(&self, _: Arc<Document>, _: Arc<Facts>, _: bool) -> BoxFuture<'static, PassResult> {
            let n = self.passes.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n > 0 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                converged()
            })
        }
    }
    let (etx, erx) = mpsc::unbounded_channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let passes = Arc::new(AtomicU64::new(0));
    let engine = Engine::start(
        vec![Arc::new(Slow {
            events: tokio::sync::Mutex::new(Some(erx)),
            passes: passes.clone(),
        })],
        cfg(),
        Some(doc(1)),
        tx,
    );
    last_state(&mut rx, "slow", State::Converged).await;
    etx.send(HostEvent("container svc-0 create".into()))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 1..=100 {
        etx.send(HostEvent(format!("container svc-{i} start")))
            .unwrap();
    }
    // Well before the next resync (54-66 s after the last pass started).
    tokio::time::sleep(Duration::from_secs(20)).await;
    // The first pass, the one for svc-0, one for the whole burst.
    assert_eq!(passes.load(Ordering::SeqCst), 3);
    engine.shutdown().await;
}

#[test]
fn retries_and_verifications_finish_a_drift_repair() {
    let event = Reason::HostEvent("container web died".into());
    assert!(repairs_drift(false, &event));
    assert!(repairs_drift(false, &Reason::Resync));
    // A repair that failed is finished by its retry, then verified.
    assert!(repairs_drift(true, &Reason::Retry));
    assert!(repairs_drift(true, &Reason::Verify));
    // A new document's retry is not a repair; a document or a wake-up ends the chain.
    assert!(!repairs_drift(false, &Reason::Retry));
    assert!(!repairs_drift(true, &Reason::Document));
    assert!(!repairs_drift(true, &Reason::Facts));
    assert!(!repairs_drift(true, &Reason::Requeue));
}

#[test]
fn backoff_grows_with_jitter_and_caps() {
    let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let d: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
    assert!(d[0] >= Duration::from_millis(250) && d[0] <= Duration::from_millis(500));
    assert!(d[4] >= Duration::from_secs(4) && d[4] <= Duration::from_secs(8));
    assert!(d.iter().all(|x| *x <= Duration::from_secs(60)));
    assert!(d[11] >= Duration::from_secs(30));
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn a_change_under_way_is_progressing_until_it_completes() {
    // Passes 1-2 wait on a step of a change under way (a replacement waiting for the
    // firewall to switch); pass 3 finds it done.
    let (s, _times) = timed("swap", |n| match n {
        1 | 2 => converged_with(
            vec![Waiting::new(
                "container",
                "web",
                "old instance serves until firewall switches",
            )
            .retry_after(Duration::from_millis(250))
            .in_progress()],
            None,
            None,
        ),
        _ => converged(),
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::start(vec![Arc::new(s)], cfg(), Some(doc(1)), tx);
    let mut st = last_state(&mut rx, "swap", State::Progressing).await;
    while !st.message.contains("under way") {
        assert_ne!(st.state, State::Converged, "converged while under way");
        st = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("no report")
            .expect("closed")
            .status;
    }
    assert_eq!(st.waiting.len(), 1);
    let st = last_state(&mut rx, "swap", State::Converged).await;
    assert!(st.waiting.is_empty());
    engine.shutdown().await;
}

/// `converge apply` reads a pass by the engine's rule: the same states and messages,
/// without the retries (a failure on its own delay counts, changes left after one apply
/// mean Degraded).
#[test]
fn apply_reads_a_pass_by_the_engines_rule() {
    let change = || Change::new(converge_core::Op::Create, "file", "x");
    let failed = ObjectOutcome::failed("file x", "disk full");
    let mut later = ObjectOutcome::failed("container web", "crash-loop");
    later.retry = converge_core::Retry::After(Duration::from_secs(30));
    let converged = ran(vec![], vec![]);
    let state = |r: &PassResult, v: Option<&PassResult>| judge_once(r, v).0;

    assert_eq!(state(&PassResult::Unmanaged, None), State::Unmanaged);
    assert_eq!(
        judge_once(&ran(vec![change()], vec![failed.clone()]), None).1,
        status::failed_message(
            std::slice::from_ref(&failed),
            &Failures::of(std::slice::from_ref(&failed)).all()
        )
    );
    assert_eq!(
        state(&ran(vec![change()], vec![later]), None),
        State::Degraded
    );
    assert_eq!(
        state(&ran(vec![change()], vec![]), Some(&converged)),
        State::Converged
    );
    assert_eq!(
        judge_once(
            &ran(vec![change()], vec![]),
            Some(&ran(vec![change()], vec![]))
        )
        .1,
        "1 changes remain after apply"
    );
    let under_way = PassResult::Ran {
        changes: vec![],
        waiting: vec![converge_core::Waiting::new("route", "a", "switching").in_progress()],
        outcomes: vec![],
        facts: None,
        notes: vec![],
        requeue_after: None,
        owned: None,
    };
    assert_eq!(
        judge_once(&converged, Some(&under_way)),
        (State::Progressing, "1 change under way".to_string(), vec![])
    );
    assert_eq!(
        judge_once(
            &PassResult::Failed {
                error: "boom".into(),
                transient: false
            },
            None
        )
        .0,
        State::Degraded
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_object_degrades_without_hot_retries_and_is_one_event() {
    // A repository converge will not initialise: stuck until the operator acts. Passes
    // come only from its own look-again delay, and the event is journaled once.
    let (s, times) = timed("stuck", |n| match n {
        1..=3 => converged_with(
            vec![
                Waiting::new("repository", "local", "/srv/borg is not a borg repository")
                    .retry_after(Duration::from_secs(60))
                    .failed(),
            ],
            None,
            None,
        ),
        _ => converged(),
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hourly = EngineConfig {
        resync: Duration::from_secs(3600),
        ..Default::default()
    };
    let engine = Engine::start(vec![Arc::new(s)], hourly, Some(doc(1)), tx);
    // Every report's journal lines are counted until the state wanted comes.
    let mut journaled = 0;
    let mut until = async |want: State| loop {
        let r = tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("no report")
            .expect("closed");
        journaled += r.journal.len();
        if r.status.state == want {
            break r.status;
        }
    };
    let st = until(State::Degraded).await;
    assert_eq!(st.message, "repository local failed");
    assert_eq!(st.object_errors.len(), 1, "{st:?}");
    assert!(st.object_errors[0].error.contains("not a borg repository"));
    assert!(
        st.waiting.is_empty(),
        "listed with the errors, not as waiting"
    );
    let st = until(State::Converged).await;
    assert!(st.object_errors.is_empty());
    // Three looks, a minute apart (its own delay), not a retry loop; one event.
    let t = pass_times(&times);
    assert_eq!(t.len(), 4, "{t:?}");
    assert!(t.windows(2).all(|w| w[1] - w[0] >= 59.0), "{t:?}");
    assert_eq!(journaled, 1);
    engine.shutdown().await;
}
