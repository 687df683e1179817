//! Docker's event stream: one host event per relevant lifecycle event of a
//! converge-managed container, resubscribing forever.

use super::*;

/// Pause before the event stream reconnects after the daemon went away.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Container events that change what `observe` would see. Exec events (one per health
/// probe) are left out on purpose: they would trigger a pass every probe interval.
const WATCHED_EVENTS: &[&str] = &[
    "create",
    "start",
    "die",
    "destroy",
    "health_status",
    "oom",
    "pause",
    "unpause",
    "rename",
];

/// The host event for one Docker event: the container's document name and the action.
fn event_of(ev: EventMessage) -> HostEvent {
    let actor = ev.actor.unwrap_or_default();
    let name = actor
        .attributes
        .and_then(|mut a| a.remove(LABEL_NAME))
        .or(actor.id.map(|id| id.chars().take(12).collect()))
        .unwrap_or_default();
    HostEvent(format!(
        "container {name} {}",
        ev.action.unwrap_or_default()
    ))
}

pub(super) type EventStream = BoxStream<'static, Result<EventMessage, BollardError>>;

pub(super) enum EventState {
    /// Not subscribed; `missed` when events may have been lost since the last stream.
    Connect {
        missed: bool,
    },
    Open(EventStream),
}

/// Waits for the next ping, (re)subscribing as needed; never gives up.
pub(super) async fn next_event(inner: &Inner, mut state: EventState) -> (HostEvent, EventState) {
    loop {
        state = match state {
            EventState::Connect { missed } => match subscribe(inner).await {
                Ok(stream) if missed => {
                    // Something may have changed while we were away: one ping to resync.
                    let reconnected = HostEvent("docker events reconnected".into());
                    return (reconnected, EventState::Open(stream));
                }
                Ok(stream) => EventState::Open(stream),
                Err(e) => {
                    debug!(error = %e, "docker events: daemon unreachable, retrying");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    EventState::Connect { missed: true }
                }
            },
            EventState::Open(mut stream) => match stream.next().await {
                Some(Ok(ev)) => return (event_of(ev), EventState::Open(stream)),
                Some(Err(e)) => {
                    warn!(error = %e, "docker events: stream failed, reconnecting");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    EventState::Connect { missed: true }
                }
                None => {
                    debug!("docker events: stream ended, reconnecting");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    EventState::Connect { missed: true }
                }
            },
        };
    }
}

/// Opens a filtered event stream. The ping first makes "connected" observable: bollard's
/// stream only reports a dead socket when polled.
async fn subscribe(inner: &Inner) -> Result<EventStream, DriverError> {
    let socket = inner.socket.to_string_lossy();
    let client = inner.client().await?;
    client
        .ping()
        .await
        .map_err(|e| api_failed("events", &socket, e))?;
    let filters: HashMap<String, Vec<String>> = HashMap::from([
        ("type".into(), vec!["container".into()]),
        ("label".into(), vec![format!("{LABEL_MANAGED}=true")]),
        (
            "event".into(),
            WATCHED_EVENTS.iter().map(|e| e.to_string()).collect(),
        ),
    ]);
    Ok(client
        .events(Some(EventsOptions {
            since: None,
            until: None,
            filters,
        }))
        .boxed())
}
