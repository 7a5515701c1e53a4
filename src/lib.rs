//! butler: an access-control reverse proxy for Ollama.
//!
//! The binary's entry point is [`cli::main`]; everything else is internal and
//! public only so that fuzz targets and benchmarks can reach the pure parsers.

pub mod addr;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod coding;
pub mod config;
pub mod cors;
pub mod health;
pub mod http;
pub mod inspect;
pub mod jsonscan;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod usage;
