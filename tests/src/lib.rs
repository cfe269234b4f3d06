//! NAT lab harness
