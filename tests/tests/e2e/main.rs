//! e2e

mod lab;
