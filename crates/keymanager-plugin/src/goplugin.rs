//! hashicorp/go-plugin's own services: broker, controller and stdio.

use std::pin::Pin;
use std::sync::Arc;

use keymanager_proto::goplugin::grpc_broker_server::GrpcBroker;
use keymanager_proto::goplugin::grpc_controller_server::GrpcController;
use keymanager_proto::goplugin::grpc_stdio_server::GrpcStdio;
use keymanager_proto::goplugin::{ConnInfo, Empty, StdioData};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Tells every long-lived stream and the server loop that the process is stopping.
#[derive(Clone)]
pub(crate) struct ShutdownSignal(Arc<tokio::sync::watch::Sender<bool>>);

impl ShutdownSignal {
    pub(crate) fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }

    pub(crate) fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub(crate) async fn wait(&self) {
        let mut receiver = self.0.subscribe();
        // Err means the sender is gone, which also means shutdown.
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }
}

/// `plugin.GRPCBroker`: SPIRE always announces its host-service listener (service id 1)
/// over this stream at load time. A KeyManager needs no host services, so the announcements
/// are read and dropped, but the stream must stay open until the host cancels it; ending
/// it early makes the host's send fail and the plugin fail to load.
pub(crate) struct Broker {
    shutdown: ShutdownSignal,
}

impl Broker {
    pub(crate) fn new(shutdown: ShutdownSignal) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcBroker for Broker {
    type StartStreamStream = ResponseStream<ConnInfo>;

    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.wait() => break,
                    message = incoming.next() => match message {
                        Some(Ok(info)) => tracing::debug!(
                            service_id = info.service_id,
                            network = %info.network,
                            "host announced a broker connection (not needed by a KeyManager)"
                        ),
                        Some(Err(_)) | None => break,
                    },
                }
            }
        });
        // Our side never sends; the stream ends at shutdown.
        let shutdown = self.shutdown.clone();
        let outgoing = futures_stream_until(shutdown);
        Ok(Response::new(outgoing))
    }
}

/// `plugin.GRPCController`: Shutdown answers at once and starts the exit.
pub(crate) struct Controller {
    shutdown: ShutdownSignal,
}

impl Controller {
    pub(crate) fn new(shutdown: ShutdownSignal) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("Shutdown requested by the host; exiting");
        self.shutdown.trigger();
        Ok(Response::new(Empty {}))
    }
}

/// `plugin.GRPCStdio`: we never write to stdout/stderr through it (logs go to stderr
/// directly), so the stream just stays open until shutdown, as a Go plugin's does.
pub(crate) struct Stdio {
    shutdown: ShutdownSignal,
}

impl Stdio {
    pub(crate) fn new(shutdown: ShutdownSignal) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = ResponseStream<StdioData>;

    async fn stream_stdio(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::StreamStdioStream>, Status> {
        Ok(Response::new(futures_stream_until(self.shutdown.clone())))
    }
}

/// An empty stream that ends when shutdown starts.
fn futures_stream_until<T: Send + 'static>(shutdown: ShutdownSignal) -> ResponseStream<T> {
    Box::pin(
        tokio_stream::once(())
            .then(move |()| {
                let shutdown = shutdown.clone();
                async move { shutdown.wait().await }
            })
            .filter_map(|()| None),
    )
}
