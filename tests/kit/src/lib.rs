//! Meridian's test world, shared by the end-to-end tests, the load generator and `meridian demo`:
//! simulated regional origins with OpenAI-compatible model servers, the demo world around an
//! edge, a throw-away certificate authority, the project's HTTP/3 client and the test-world GeoIP
//! database. Nothing here is on the production path, so the gateway links it only for the demo.

pub mod config_service;
pub mod demo;
pub mod devcerts;
pub mod h3client;
mod httpd;
pub mod model_server;
pub mod origin;
pub mod test_world;

pub use demo::LOCAL_CONFIG;
