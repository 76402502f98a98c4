//! The domain: plain data and pure functions, testable without a network.
//!
//! A job enters as bytes ([`job::Job::parse`]), WeChat's answer is judged by the errcode table
//! ([`errcode::classify`]), and everything downstream sees a [`result::SendResult`] or a
//! [`result::DeliveryEvent`]. Pushes from WeChat are checked by [`crypto`] and read by [`receipt`].

pub mod calendar;
pub mod crypto;
pub mod errcode;
pub mod job;
pub mod outcome;
pub mod receipt;
pub mod result;
pub mod subscribe;
