"""The store's schema: ordered migrations, applied above the file's schema_version at first use."""
from __future__ import annotations

# Ordered migrations; the store applies those above the file's schema_version at first use.
MIGRATIONS: list[str] = [
    # 1: the foundation.
    """
    CREATE TABLE datasets (
        name        VARCHAR PRIMARY KEY,
        kind        VARCHAR NOT NULL,          -- imagefolder | manifest | fashion-mnist
        source      VARCHAR NOT NULL,          -- folder or manifest path as given
        root        VARCHAR NOT NULL,          -- folder the image paths are relative to
        options     JSON,
        image_size  INTEGER,                   -- working size of the pixel cache (square)
        channels    INTEGER,                   -- 1 (grayscale) or 3 (RGB)
        pixels      VARCHAR,                   -- .npy pixel cache [N, S, S, C] uint8, rows = images.row
        classes     VARCHAR[],
        created_at  TIMESTAMP DEFAULT current_timestamp,
        scanned_at  TIMESTAMP
    );
    CREATE TABLE images (
        dataset     VARCHAR NOT NULL,
        row         INTEGER NOT NULL,          -- row in the dataset's pixel cache
        path        VARCHAR NOT NULL,          -- relative to the dataset root
        image_id    VARCHAR NOT NULL,          -- content id: hash of the file's bytes
        pixel_hash  VARCHAR NOT NULL,          -- hash of the decoded pixels
        label       VARCHAR NOT NULL,
        split       VARCHAR NOT NULL,          -- train | val | test
        width       INTEGER, height INTEGER, mode VARCHAR,
        size_bytes  BIGINT, mtime DOUBLE,
        PRIMARY KEY (dataset, path)
    );
    CREATE TABLE problems (
        dataset     VARCHAR NOT NULL,
        path        VARCHAR NOT NULL,
        severity    VARCHAR NOT NULL,          -- skipped (left out) | converted (kept, note)
        reason      VARCHAR NOT NULL,
        detail      VARCHAR,
        PRIMARY KEY (dataset, path)
    );
    CREATE TABLE backbones (
        backbone_id VARCHAR PRIMARY KEY,
        dataset     VARCHAR,
        spec        VARCHAR NOT NULL,
        checkpoint  VARCHAR,
        dim         INTEGER,
        metrics     JSON,
        created_at  TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE embeddings (
        backbone_id VARCHAR NOT NULL,
        image_id    VARCHAR NOT NULL,
        vec         FLOAT[] NOT NULL,
        PRIMARY KEY (backbone_id, image_id)
    );
    CREATE TABLE projections (
        dataset     VARCHAR NOT NULL,
        backbone_id VARCHAR NOT NULL,
        method      VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,          -- of the embeddings it was computed from
        path        VARCHAR NOT NULL,
        x FLOAT, y FLOAT,
        PRIMARY KEY (dataset, backbone_id, method, path)
    );
    CREATE SEQUENCE job_ids START 1;
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY DEFAULT nextval('job_ids'),
        kind        VARCHAR NOT NULL,
        dataset     VARCHAR,
        params      JSON,
        status      VARCHAR NOT NULL,          -- queued | running | done | failed | cancelled
        pid         INTEGER,
        done        BIGINT DEFAULT 0,
        total       BIGINT,
        rate        DOUBLE,                    -- units per second
        phase       VARCHAR,
        message     VARCHAR,
        error       VARCHAR,
        result      JSON,
        log_path    VARCHAR,
        created_at  TIMESTAMP DEFAULT current_timestamp,
        started_at  TIMESTAMP,
        updated_at  TIMESTAMP,
        finished_at TIMESTAMP
    );
    CREATE TABLE job_events (
        job_id      INTEGER NOT NULL,
        ts          TIMESTAMP DEFAULT current_timestamp,
        level       VARCHAR NOT NULL,
        message     VARCHAR NOT NULL
    );
    """,
    # 2: redundant groups -- one merge tree per (dataset, backbone, linkage, class).
    """
    CREATE TABLE trees (
        dataset     VARCHAR NOT NULL,
        backbone_id VARCHAR NOT NULL,
        linkage     VARCHAR NOT NULL,
        label       VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,          -- of the members' content ids, in order
        members     VARCHAR[] NOT NULL,        -- image paths, leaf i = members[i]
        merges      BLOB NOT NULL,             -- float64 [n-1, 4] scipy linkage matrix
        meta        JSON,
        created_at  TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (dataset, backbone_id, linkage, label)
    );
    """,
    # 3: LTRP -- trained MAEs and rankers, and one score map per (ranker, image content id).
    """
    CREATE TABLE ltrp_models (
        model_id    VARCHAR PRIMARY KEY,       -- cache key (kind, dataset, config, recipe, parent)
        dataset     VARCHAR,
        kind        VARCHAR NOT NULL,          -- mae | ranker
        parent      VARCHAR,                   -- a ranker's MAE model_id
        checkpoint  VARCHAR NOT NULL,
        config      JSON,
        metrics     JSON,
        created_at  TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE patch_scores (
        ranker_id   VARCHAR NOT NULL,
        image_id    VARCHAR NOT NULL,
        scores      FLOAT[] NOT NULL,          -- one score per patch, row-major
        PRIMARY KEY (ranker_id, image_id)
    );
    """,
    # 4: subset training -- sweeps and their runs (one row per distinct run: recipe x subset x seed).
    """
    CREATE SEQUENCE sweep_ids START 1;
    CREATE TABLE sweeps (
        id          INTEGER PRIMARY KEY DEFAULT nextval('sweep_ids'),
        dataset     VARCHAR NOT NULL,
        spec        JSON NOT NULL,             -- fractions, methods, seeds, recipe, subset settings
        job_id      INTEGER,                   -- the scheduler job
        created_at  TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE train_runs (
        run_key     VARCHAR PRIMARY KEY,       -- hash of everything that decides the result
        dataset     VARCHAR NOT NULL,
        sweep_id    INTEGER,                   -- the sweep that last asked for it
        method      VARCHAR NOT NULL,          -- full | semantic | random
        fraction    DOUBLE NOT NULL,
        seed        INTEGER NOT NULL,
        selection   JSON NOT NULL,             -- backbone, linkage, representative of the subset
        recipe      JSON NOT NULL,
        subset_fp   VARCHAR NOT NULL,          -- fingerprint of the training images' content ids
        n_train     INTEGER NOT NULL,
        status      VARCHAR NOT NULL,          -- pending | running | done | failed | cancelled
        job_id      INTEGER,
        metrics     JSON,
        error       VARCHAR,
        created_at  TIMESTAMP DEFAULT current_timestamp,
        finished_at TIMESTAMP
    );
    """,
    # 5: job lanes -- the lane a job runs in, and what a queued job waits for.
    """
    ALTER TABLE jobs ADD COLUMN lane VARCHAR;          -- light | quick | heavy (core.jobs)
    ALTER TABLE jobs ADD COLUMN waiting_for JSON;      -- while queued for a slot: {lane, jobs: [holders]}
    """,
    # 6: what a person reviews -- near-identical images with different labels, found once per
    # (dataset, backbone) by the cluster job (core.redundancy.review), not on every page rerun.
    """
    CREATE TABLE review_state (
        dataset      VARCHAR NOT NULL,
        backbone_id  VARCHAR NOT NULL,
        fingerprint  VARCHAR NOT NULL,          -- of the embedded images' rows, content ids, labels
        max_distance DOUBLE,                    -- pairs up to this cosine distance are stored
        pairs        INTEGER,
        note         VARCHAR,                   -- why nothing was computed (e.g. too many images)
        computed_at  TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (dataset, backbone_id)
    );
    CREATE TABLE label_conflicts (
        dataset      VARCHAR NOT NULL,
        backbone_id  VARCHAR NOT NULL,
        row_a        INTEGER NOT NULL,          -- pixel-cache rows (images.row); the labels differ
        row_b        INTEGER NOT NULL,
        distance     FLOAT NOT NULL
    );
    """,
    # 7: display thumbnails, one per content id, made by the scan from the decoded file (core.data.scan);
    # only for images the working-size pixel cache does not hold whole (larger, or not square).
    """
    CREATE TABLE thumbnails (
        image_id     VARCHAR PRIMARY KEY,       -- content id (images.image_id), shared by every dataset
        format       VARCHAR NOT NULL,          -- WEBP
        width        INTEGER NOT NULL,          -- upright, at most core.data.decode.THUMB_SIDE on the long side
        height       INTEGER NOT NULL,
        data         BLOB NOT NULL
    );
    """,
    # 8: where a job ran: NULL on this machine, else the Ray cluster (core.scale): address, nodes, CPUs,
    # GPUs and how many workers the job used.
    """
    ALTER TABLE jobs ADD COLUMN ran_on JSON;
    """,
    # 9: settings made in the app that jobs and the CLI read too, one value per key (e.g. 'ray_address':
    # the Ray cluster heavy jobs go to, core.scale.setting).
    """
    CREATE TABLE settings (
        key          VARCHAR PRIMARY KEY,
        value        VARCHAR NOT NULL,
        updated_at   TIMESTAMP DEFAULT current_timestamp
    );
    """,
    # 10: near copies by pixels (ours, beside the paper's method; core.redundancy.copies), found once per
    # (dataset, pixel cache, settings) by the cluster job and joined first in the merge trees.
    """
    CREATE TABLE copy_state (
        dataset      VARCHAR PRIMARY KEY,
        enabled      BOOLEAN NOT NULL,          -- join near copies in the trees (default on)
        fingerprint  VARCHAR,                   -- of the train images (rows, pixel hashes, labels) + settings
        settings     JSON,
        pairs        INTEGER,
        seconds      DOUBLE,
        computed_at  TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE copy_pairs (
        dataset      VARCHAR NOT NULL,
        row_a        INTEGER NOT NULL,          -- pixel-cache rows (images.row), same label, row_a < row_b
        row_b        INTEGER NOT NULL,
        distance     FLOAT NOT NULL             -- tolerant pixel distance (1 - best Pearson r)
    );
    """,
    # 11: the near-copy search stored class by class as each class finishes, so a killed or cancelled search
    # resumes at the classes with no current result, and a changed class is searched again alone
    # (core.redundancy.clusterings.ensure_copy_pairs). copy_pairs stays what the trees join: it is replaced
    # from these rows in one transaction when every class has a current result.
    """
    CREATE TABLE copy_classes (
        dataset      VARCHAR NOT NULL,
        label        VARCHAR NOT NULL,
        fingerprint  VARCHAR NOT NULL,          -- of the class's rows and pixel hashes, the pixel cache, the settings
        pairs        INTEGER NOT NULL,
        rows         BLOB NOT NULL,             -- int32 [pairs, 2] pixel-cache rows, row_a < row_b
        distances    BLOB NOT NULL,             -- float32 [pairs]
        seconds      DOUBLE,                    -- the class's search, where it ran (a Ray worker or here)
        computed_at  TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (dataset, label)
    );
    """,
]
