//! The libpod call podman-api 0.10 cannot make as converge needs it: container create
//! with a body built here (its builder serializes `log_configuration` in Docker's
//! `{Type, Config}` shape, which libpod ignores). Same transport, API version and error
//! type as podman-api's own calls, so errors read the same.

use containers_api::conn::hyper::{Body, Client, Response};
use containers_api::conn::{get_unix_connector, Headers, Payload, RequestClient, Transport};
use podman_api::models::ContainerCreateCreatedBody;
use podman_api::Error as PodmanError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// A libpod client for raw JSON bodies on a unix socket.
#[derive(Clone, Debug)]
pub(super) struct Raw {
    client: RequestClient<PodmanError>,
}

impl Raw {
    pub(super) fn unix(socket: &Path) -> Raw {
        Raw {
            client: RequestClient::new(
                Transport::Unix {
                    // Like podman-api: no idle connections kept to a service that may restart.
                    client: Client::builder()
                        .pool_max_idle_per_host(0)
                        .build(get_unix_connector()),
                    path: socket.to_path_buf(),
                },
                Box::new(validate),
            ),
        }
    }

    /// `POST /libpod/containers/create` with `body` (a SpecGenerator).
    pub(super) async fn create(
        &self,
        body: &serde_json::Value,
    ) -> Result<ContainerCreateCreatedBody, PodmanError> {
        let bytes = serde_json::to_vec(body)?;
        self.client
            .post_json(
                podman_api::LATEST_API_VERSION.make_endpoint("/libpod/containers/create"),
                Payload::Json(bytes),
                Headers::none(),
            )
            .await
    }
}

/// Passes 2xx responses on; turns others into podman-api's `Fault` with libpod's
/// `message: cause`, as podman-api does.
fn validate(
    response: Response<Body>,
) -> Pin<Box<dyn Future<Output = Result<Response<Body>, PodmanError>> + Send + Sync>> {
    Box::pin(async move {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = containers_api::conn::hyper::body::to_bytes(response.into_body())
            .await
            .map_err(containers_api::conn::Error::from)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let message = match serde_json::from_str::<podman_api::models::ErrorModel>(&text) {
            Ok(e) => format!(
                "{}: {}",
                e.message.unwrap_or_default(),
                e.cause.unwrap_or_default()
            ),
            Err(_) if text.trim().is_empty() => status
                .canonical_reason()
                .unwrap_or("unknown error code")
                .to_string(),
            Err(_) => text,
        };
        Err(PodmanError::Fault {
            code: status,
            message,
        })
    })
}
