//! Podman's event stream: one host event per relevant lifecycle event of a
//! converge-managed container, reconnecting forever; keeps the inspect cache honest.

use super::*;

/// Container events that change what `observe` would see. Exec events (one pair per
/// health probe) and mount/cleanup chatter are left out on purpose.
pub(super) const WATCHED_EVENTS: &[&str] = &[
    "create",
    "start",
    "restart",
    "stop",
    "died",
    "die",
    "kill",
    "oom",
    "pause",
    "unpause",
    "rename",
    "remove",
    "health_status",
];

/// Forwards one host event per relevant event of a converge-managed container into `tx`,
/// reconnecting forever; a reconnect pings once since events may have been missed.
pub(super) async fn pump_events(
    api: podman_api::Podman,
    inspected: Arc<InspectCache>,
    mut tx: mpsc::Sender<HostEvent>,
) {
    let mut ping = move |event: HostEvent| match tx.try_send(event) {
        // Full: a ping is already pending, which is all the consumer needs.
        Ok(()) => true,
        Err(e) => !e.is_disconnected(),
    };
    let mut last_health: HashMap<String, Option<Health>> = HashMap::new();
    let mut missed = false;
    // Dropping the stream stops the pump: the cache must not outlive the events.
    struct Off(Arc<InspectCache>);
    impl Drop for Off {
        fn drop(&mut self) {
            self.0.set_live(false);
        }
    }
    let _off = Off(inspected.clone());
    loop {
        // Ping first: the event stream only reports a dead socket once an event is due.
        if let Err(e) = api.ping().await {
            debug!(error = %e, "podman events: service unreachable, retrying");
            missed = true;
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        }
        if missed && !ping(HostEvent("podman events reconnected".into())) {
            return;
        }
        let opts = EventsOpts::builder()
            .stream(true)
            .filters([
                ("type".to_string(), vec!["container".to_string()]),
                ("label".to_string(), vec![format!("{LABEL_MANAGED}=true")]),
            ])
            .build();
        let mut events = api.events(&opts);
        inspected.set_live(true);
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(error = %e, "podman events: stream failed, reconnecting");
                    break;
                }
            };
            if ev.typ != "container" {
                continue;
            }
            // Whatever happened, the last inspect of this container is no longer trusted.
            inspected.forget(&ev.actor.id);
            if !WATCHED_EVENTS.contains(&ev.action.as_str()) {
                continue;
            }
            let id = ev.actor.id;
            let name = ev
                .actor
                .attributes
                .get(LABEL_NAME)
                .cloned()
                .unwrap_or_else(|| id.chars().take(12).collect());
            let what = HostEvent(format!("container {name} {}", ev.action));
            let relevant = match ev.action.as_str() {
                "health_status" => {
                    // Sent on every probe: only a change of health matters.
                    let now = match api.containers().get(&id).inspect().await {
                        Ok(c) => c
                            .state
                            .and_then(|s| s.health)
                            .and_then(|h| h.status)
                            .as_deref()
                            .and_then(health),
                        Err(_) => None,
                    };
                    last_health.insert(id, now) != Some(now)
                }
                "remove" => {
                    last_health.remove(&id);
                    true
                }
                _ => true,
            };
            if relevant && !ping(what) {
                return;
            }
        }
        debug!("podman events: stream ended, reconnecting");
        inspected.set_live(false);
        missed = true;
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}
