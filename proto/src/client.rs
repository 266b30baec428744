//! Connecting to an agent's local API over its Unix socket.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::v1::api_client::ApiClient;

/// Connects to the local API at `path`. Fails at once when nothing listens
/// there, rather than returning a channel that retries in the background.
pub async fn connect_unix(
    path: &Path,
) -> Result<ApiClient<Channel>, Box<dyn std::error::Error + Send + Sync>> {
    tokio::net::UnixStream::connect(path).await?;
    let path = path.to_path_buf();
    let channel = Endpoint::from_static("http://uc.local")
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(ApiClient::new(channel).max_decoding_message_size(crate::MAX_PEER_MESSAGE_BYTES))
}
