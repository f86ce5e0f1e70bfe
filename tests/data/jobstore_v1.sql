-- A job store made by cxr-ai's first release (schema version 1, commit 0ee0d58):
-- two studies, one with results queued for 'pacs', one not applicable (body_part).
BEGIN TRANSACTION;
CREATE TABLE instances (
    sop_key       TEXT PRIMARY KEY,
    sop_uid       TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_key     TEXT NOT NULL REFERENCES studies(study_key),
    path          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    calling_ae    TEXT NOT NULL DEFAULT '',
    received_at   REAL NOT NULL,
    state         TEXT NOT NULL,
    reason        TEXT NOT NULL DEFAULT '',
    result_json   TEXT
);
INSERT INTO "instances" VALUES('1.2.3.1.1','1.2.3.1.1','1.2.840.10008.5.1.4.1.1.1','1.2.3.1','/spool/instances/1.2.3.1/1.2.3.1.1.dcm',100,'ORTHANC',1000.0,'processed','','{"findings": []}');
INSERT INTO "instances" VALUES('1.2.3.2.1','1.2.3.2.1','1.2.840.10008.5.1.4.1.1.1','1.2.3.2','/spool/instances/1.2.3.2/1.2.3.2.1.dcm',100,'ORTHANC',1000.0,'not_applicable','body_part: not a chest',NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    study_key       TEXT NOT NULL REFERENCES studies(study_key),
    job_id          TEXT NOT NULL,
    destination     TEXT NOT NULL,
    items           TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    sent_at         REAL
);
INSERT INTO "outbox" VALUES(1,'1.2.3.1','J5c8c85834a5d','pacs','["SR-x.dcm"]','pending',0,1001.0,'',1001.0,1001.0,NULL);
CREATE TABLE studies (
    study_key        TEXT PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    job_id           TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    reason           TEXT NOT NULL DEFAULT '',
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    last_received_at REAL NOT NULL,
    ready_at         REAL,
    processed_at     REAL,
    results_sent_at  REAL,
    files_removed    INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "studies" VALUES('1.2.3.1','1.2.3.1','J5c8c85834a5d','sending','',1,1000.0,1001.0,1000.0,1000.0,1001.0,NULL,0);
INSERT INTO "studies" VALUES('1.2.3.2','1.2.3.2','J14ea623b9b42','not_applicable','no instance the models may read',1,1000.0,1001.0,1000.0,1000.0,1001.0,NULL,0);
CREATE INDEX studies_state ON studies(state, ready_at);
CREATE INDEX instances_study ON instances(study_key, state);
CREATE INDEX outbox_due ON outbox(destination, state, next_attempt_at);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('outbox',1);
COMMIT;
